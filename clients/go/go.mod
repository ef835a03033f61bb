// Keel's generated Go client (package keelv1): scripts/gen writes keel/v1 from
// proto/ with buf (buf.gen.yaml). The generated code needs grpc-go >= 1.32
// (grpc.SupportPackageIsVersion7) and protobuf-go >= 1.28; `go mod tidy` (with
// the module proxy) pins them and writes go.sum.
module github.com/keel-dev/keel/clients/go

go 1.19
