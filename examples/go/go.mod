// The Go demo: go run . [TARGET]. Its only dependency is the generated client
// next door (clients/go); `go mod tidy` (with the module proxy) pins grpc-go
// and protobuf-go and writes go.sum.
module github.com/keel-dev/keel/examples/go

go 1.19

require github.com/keel-dev/keel/clients/go v0.0.0

replace github.com/keel-dev/keel/clients/go => ../../clients/go
