// Keel demo in Go: stream a run, drop the connection mid-stream, resume it on
// a new connection, prove nothing was lost or repeated.
//
//	go run . [TARGET]
//
// TARGET (or $KEEL_TARGET) is the server's host:port, 127.0.0.1:50051 by
// default; the server must run the `scripted` test agent
// (`python -m server serve --agents server.agents.testing:registry`). Exits
// 1 unless the events read before and after the drop are exactly 0, 1, ...,
// n-1, ending with the run's `finish`. The twin of examples/python/demo.py;
// follow.go is the resume loop of docs/clients.md, in Go.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	keelv1 "github.com/keel-dev/keel/clients/go/keel/v1"
)

const (
	textDeltas      = 80 // the script's text steps together
	dropAfterEvents = 30
	timeout         = 60 * time.Second
	maxReconnects   = 5 // a demo should fail fast when no server answers
)

var script = map[string]any{
	"steps": []map[string]any{
		{"text": 40, "delay_ms": 20},
		{"tool": "record", "args": map[string]string{"key": "demo"}},
		{"text": 40, "delay_ms": 20},
	},
}

// printer prints text deltas as they stream and every other event as an
// [index kind] line.
type printer struct{ midLine bool }

func (p *printer) text(text string) {
	fmt.Print(text)
	p.midLine = true
}

func (p *printer) line(format string, args ...any) {
	if p.midLine {
		fmt.Println()
	}
	fmt.Printf(format+"\n", args...)
	p.midLine = false
}

func (p *printer) event(event *keelv1.AgentEvent) {
	switch payload := event.Payload.(type) {
	case *keelv1.AgentEvent_TextDelta:
		p.text(payload.TextDelta.Delta)
	case *keelv1.AgentEvent_ToolCall:
		p.line("[%d tool_call %s]", event.Index, payload.ToolCall.ToolName)
	case *keelv1.AgentEvent_ToolResult:
		p.line("[%d tool_result %s]", event.Index, payload.ToolResult.ResultJson)
	case *keelv1.AgentEvent_Start, *keelv1.AgentEvent_StepStart, *keelv1.AgentEvent_StepFinish,
		*keelv1.AgentEvent_Finish, *keelv1.AgentEvent_Error, *keelv1.AgentEvent_Abort:
		p.line("[%d %s]", event.Index, kind(event))
	}
}

// kind is the name of an event's payload field, e.g. "text_delta".
func kind(event *keelv1.AgentEvent) string {
	payload := event.ProtoReflect().WhichOneof(event.ProtoReflect().Descriptor().Oneofs().ByName("payload"))
	if payload == nil {
		return ""
	}
	return string(payload.Name())
}

var out printer

func dial(ctx context.Context, target string) (*grpc.ClientConn, error) {
	// WithInsecure: cleartext, as the demo server listens. It builds with every
	// grpc-go from 1.32 (Debian's 1.33) to today's, where it is deprecated in
	// favour of grpc.WithTransportCredentials(insecure.NewCredentials()).
	return grpc.DialContext(ctx, target, grpc.WithInsecure()) //nolint:staticcheck
}

func demo(ctx context.Context, target string) error {
	input, err := json.Marshal(script)
	if err != nil {
		return err
	}
	onReconnect := func(r Reconnect) {
		out.line("-- stream lost (%s); resuming at offset %d", status.Convert(r.Err).Message(), r.Offset)
	}
	var events []*keelv1.AgentEvent

	// 1. Start a run and read it until we deliberately drop the connection.
	first, err := dial(ctx, target)
	if err != nil {
		return err
	}
	start := &Follower{
		Client:        keelv1.NewAgentServiceClient(first),
		Start:         &keelv1.StreamRequest{AgentId: "scripted", Input: string(input), RequestId: newRequestID()},
		MaxReconnects: maxReconnects,
		OnReconnect:   onReconnect,
	}
	err = start.Follow(ctx, func(event *keelv1.AgentEvent) bool {
		events = append(events, event)
		out.event(event)
		return len(events) < dropAfterEvents // false: stop reading, the call is cancelled
	})
	first.Close()
	if err != nil {
		return err
	}
	if start.RunID == "" {
		return fmt.Errorf("the stream ended before its snapshot named the run")
	}
	out.line("-- dropped the connection after %d events of run %s", len(events), start.RunID)

	// 2. A new connection picks the run up where we left it.
	second, err := dial(ctx, target)
	if err != nil {
		return err
	}
	defer second.Close()
	client := keelv1.NewAgentServiceClient(second)
	resumedAt := start.NextOffset
	out.line("-- resumed at offset %d", resumedAt)
	rest := &Follower{Client: client, RunID: start.RunID, NextOffset: resumedAt, MaxReconnects: maxReconnects, OnReconnect: onReconnect}
	err = rest.Follow(ctx, func(event *keelv1.AgentEvent) bool {
		events = append(events, event)
		out.event(event)
		return true
	})
	if err != nil {
		return err
	}
	got, err := client.GetRun(ctx, &keelv1.GetRunRequest{RunId: start.RunID})
	if err != nil {
		return err
	}

	// 3. Prove nothing was lost or repeated across the drop.
	out.line("-- %d events, indices 0..%d", len(events), len(events)-1)
	found := problems(events, got.Run, resumedAt)
	for _, problem := range found {
		fmt.Fprintf(os.Stderr, "FAILED: %s\n", problem)
	}
	if len(found) > 0 {
		return fmt.Errorf("%d problems", len(found))
	}
	fmt.Println("-- OK: every event exactly once, in order, across the dropped connection")
	return nil
}

var deltaPattern = regexp.MustCompile(`^t(\d+) $`)

// problems lists everything wrong with what the demo saw; empty when the invariant holds.
func problems(events []*keelv1.AgentEvent, run *keelv1.Run, resumedAt int64) []string {
	var found []string
	for i, event := range events {
		if event.Index != int64(i) {
			found = append(found, fmt.Sprintf("indices: position %d holds %d (a gap or a duplicate)", i, event.Index))
			break
		}
	}
	if len(events) == 0 || events[len(events)-1].GetFinish() == nil {
		found = append(found, "the last event is not `finish`")
	}
	if run.GetState() != keelv1.RunState_RUN_STATE_SUCCEEDED || run.GetNextOffset() != int64(len(events)) {
		found = append(found, fmt.Sprintf("the run is %s with %d events, we saw %d", run.GetState(), run.GetNextOffset(), len(events)))
	}
	// The scripted agent numbers its text deltas "t0 ", "t1 ", ... across the whole run.
	var numbers []string
	toolResults := 0
	for _, event := range events {
		if match := deltaPattern.FindStringSubmatch(event.GetTextDelta().GetDelta()); match != nil {
			numbers = append(numbers, match[1])
		}
		if event.GetToolResult() != nil {
			toolResults++
		}
	}
	want := make([]string, textDeltas)
	for i := range want {
		want[i] = strconv.Itoa(i)
	}
	if strings.Join(numbers, " ") != strings.Join(want, " ") {
		found = append(found, fmt.Sprintf("text deltas: got %d, expected t0..t%d in order", len(numbers), textDeltas-1))
	}
	if toolResults != 1 {
		found = append(found, fmt.Sprintf("expected one tool_result, saw %d", toolResults))
	}
	if resumedAt != dropAfterEvents {
		found = append(found, fmt.Sprintf("resumed at offset %d, expected %d", resumedAt, dropAfterEvents))
	}
	return found
}

func main() {
	target := os.Getenv("KEEL_TARGET")
	if len(os.Args) > 1 {
		target = os.Args[1]
	}
	if target == "" {
		target = "127.0.0.1:50051"
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := demo(ctx, target); err != nil {
		fmt.Fprintf(os.Stderr, "\nerror: %s: %v\n", target, err)
		cancel()
		os.Exit(1)
	}
}
