package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"math"
	mathrand "math/rand"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keelv1 "github.com/keel-dev/keel/clients/go/keel/v1"
)

// Reconnect describes one reconnect of a Follower after its stream failed
// with UNAVAILABLE.
type Reconnect struct {
	Attempt int           // 1 for the first reconnect of a row without a new event
	Offset  int64         // the offset the new request resumes at
	Delay   time.Duration // how long the Follower waits before sending it
	Err     error         // the failure that caused it
}

// Follower reads a run's events exactly once and in order across dropped
// connections: the resume loop of docs/clients.md.
//
//  1. Open Observe(RunID, NextOffset); or Stream(Start) while the run's id
//     is unknown (the same request_id: the server attaches to the same run).
//  2. The snapshot comes first; take the run's id from it.
//  3. For each event: index < NextOffset is a duplicate (drop it); index >
//     NextOffset is a gap (fail); otherwise advance NextOffset, then hand it
//     to the reader.
//  4. On UNAVAILABLE wait (capped exponential backoff with jitter) and go to
//     1; give up after MaxReconnects reconnects in a row without a new event.
//     Any other status is the server's answer: return it.
//  5. The stream ending with OK means the run's terminal event was the last.
type Follower struct {
	Client        keelv1.AgentServiceClient
	RunID         string                // empty until a Stream's snapshot names the run
	NextOffset    int64                 // the index of the next event to hand over
	Start         *keelv1.StreamRequest // starts the run when RunID is empty
	MaxReconnects int                   // 0: no limit
	OnReconnect   func(Reconnect)       // called before each reconnect's wait
}

// message is what the three streams (Stream, Observe, Resume) share.
type message interface {
	GetSnapshot() *keelv1.RunSnapshot
	GetEvents() *keelv1.EventBatch
	GetHeartbeat() *keelv1.Heartbeat
}

// errStopped ends a call when the reader asked to stop.
var errStopped = errors.New("the reader stopped")

// Follow hands every event to yield, in order, until the run ends (returns
// nil), yield returns false (returns nil; the run goes on in the server, and
// Follow may be called again to continue), ctx ends, or a status other than
// UNAVAILABLE arrives.
func (f *Follower) Follow(ctx context.Context, yield func(*keelv1.AgentEvent) bool) error {
	failures := 0 // reconnects in a row that brought no new event
	for {
		before := f.NextOffset
		err := f.once(ctx, yield)
		if err == nil || errors.Is(err, errStopped) {
			return nil
		}
		if ctx.Err() != nil || status.Code(err) != codes.Unavailable {
			return err
		}
		if f.NextOffset > before {
			failures = 0
		}
		if f.MaxReconnects > 0 && failures >= f.MaxReconnects {
			return err
		}
		reconnect := Reconnect{Attempt: failures + 1, Offset: f.NextOffset, Delay: backoff(failures), Err: err}
		failures++
		if f.OnReconnect != nil {
			f.OnReconnect(reconnect)
		}
		select {
		case <-time.After(reconnect.Delay):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// once makes one call and reads it to its end.
func (f *Follower) once(ctx context.Context, yield func(*keelv1.AgentEvent) bool) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // cancels the call when the reader stops or the stream fails
	var recv func() (message, error)
	if f.RunID == "" {
		call, err := f.Client.Stream(ctx, f.Start)
		if err != nil {
			return err
		}
		recv = func() (message, error) { return call.Recv() }
	} else {
		call, err := f.Client.Observe(ctx, &keelv1.ObserveRequest{RunId: f.RunID, Offset: f.NextOffset})
		if err != nil {
			return err
		}
		recv = func() (message, error) { return call.Recv() }
	}
	hasSnapshot := false
	for {
		msg, err := recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		switch {
		case msg.GetSnapshot() != nil:
			runID := msg.GetSnapshot().GetRun().GetRunId()
			if f.RunID != "" && runID != f.RunID {
				return fmt.Errorf("expected a snapshot of run %s, got %s", f.RunID, runID)
			}
			f.RunID, hasSnapshot = runID, true
		case !hasSnapshot:
			return fmt.Errorf("the stream sent a message before its snapshot")
		case msg.GetHeartbeat() != nil:
			// A heartbeat names the next index its stream delivers; past ours
			// means the stream skipped events this reader never saw.
			if next := msg.GetHeartbeat().GetNextOffset(); next > f.NextOffset {
				return fmt.Errorf("run %s: heartbeat at %d but the next offset is %d", f.RunID, next, f.NextOffset)
			}
		case msg.GetEvents() != nil:
			for _, event := range msg.GetEvents().GetEvents() {
				if event.Index < f.NextOffset {
					continue // a duplicate, handed over before a reconnect
				}
				if event.Index > f.NextOffset {
					return fmt.Errorf("run %s: expected event %d, got %d", f.RunID, f.NextOffset, event.Index)
				}
				f.NextOffset++ // before yielding: a reader may stop at this event
				if !yield(event) {
					return errStopped
				}
			}
		}
	}
}

// backoff is the wait before reconnect number attempt (0 for the first of a
// row): 50 ms doubling up to 2 s, spread by +/- 20 %.
func backoff(attempt int) time.Duration {
	capped := math.Min(50*math.Pow(2, math.Min(float64(attempt), 64)), 2000)
	return time.Duration(capped * (0.8 + 0.4*jitter.Float64()) * float64(time.Millisecond))
}

// jitter is seeded per process (Go before 1.20 seeds math/rand with 1), so that
// clients dropped together do not come back in lockstep.
var jitter = mathrand.New(mathrand.NewSource(time.Now().UnixNano()))

// newRequestID is a random UUID (version 4), the idempotency key of a Stream.
func newRequestID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
