package preheat

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/piece"
)

// Options configures a Job.
type Options struct {
	// Schedulers are HOST:PORT; each blob goes to its rendezvous pick.
	Schedulers []string
	// PollInterval is how often the schedulers are asked how far the seeds
	// are (0: 500ms).
	PollInterval time.Duration
	// StallResend is how long a blob may show no progress before it is
	// asked of the scheduler again: the seed may have died or lost the work
	// (a scheduler restart forgets its queue), or the origin refused it
	// once. A seed already working on the blob ignores the repeat. (0: 30s)
	StallResend time.Duration
	// CallTimeout bounds one call to a scheduler, which answers from
	// memory (0: 10s).
	CallTimeout time.Duration
	// TLS, when set, is the cluster client identity for the schedulers
	// (nil: plaintext).
	TLS    *tls.Config
	Logger *slog.Logger
}

// Status is where one blob of a plan stands.
type Status struct {
	Scheduler string // the scheduler the blob went to
	Seed      string // the seed peer that took it, once one did
	Fetched   int64  // bytes the seed holds, estimated from its pieces
	Done      bool   // a seed holds the whole blob
}

// Job preheats one plan. Its methods are not for concurrent use.
type Job struct {
	plan   *Plan
	o      Options
	scheds *peer.Schedulers
	status []Status
}

// NewJob prepares the preheat of plan through o.Schedulers; Close it.
func NewJob(plan *Plan, o Options) (*Job, error) {
	if len(o.Schedulers) == 0 {
		return nil, errors.New("no scheduler")
	}
	if o.PollInterval <= 0 {
		o.PollInterval = 500 * time.Millisecond
	}
	if o.StallResend <= 0 {
		o.StallResend = 30 * time.Second
	}
	if o.CallTimeout <= 0 {
		o.CallTimeout = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	s, err := peer.DialSchedulers(o.Schedulers, peer.WithTLS(o.TLS))
	if err != nil {
		_ = s.Close()
		return nil, err
	}
	j := &Job{plan: plan, o: o, scheds: s, status: make([]Status, len(plan.Blobs))}
	for i, b := range plan.Blobs {
		j.status[i].Scheduler, _ = s.Pick(b.Work.TaskId)
	}
	return j, nil
}

// Close drops the connections to the schedulers.
func (j *Job) Close() error { return j.scheds.Close() }

// Status returns where each blob of the plan stands, in the plan's order.
func (j *Job) Status() []Status { return append([]Status(nil), j.status...) }

// bySched groups the plan's blobs by scheduler, in a stable order.
func (j *Job) bySched() ([]string, map[string][]int) {
	by := map[string][]int{}
	for i, s := range j.status {
		by[s.Scheduler] = append(by[s.Scheduler], i)
	}
	addrs := make([]string, 0, len(by))
	for a := range by {
		addrs = append(addrs, a)
	}
	sort.Strings(addrs)
	return addrs, by
}

// Enqueue sends each blob's work to its scheduler. Every scheduler is asked
// even when one fails, so that what can start starts. A scheduler that
// knows no live seed gives a *NoSeedError.
func (j *Job) Enqueue(ctx context.Context) error {
	addrs, by := j.bySched()
	var errs []error
	for _, addr := range addrs {
		if err := j.enqueueAt(ctx, addr, by[addr]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (j *Job) enqueueAt(ctx context.Context, addr string, idx []int) error {
	req := &schedulerpb.PreheatRequest{}
	for _, i := range idx {
		req.Tasks = append(req.Tasks, j.plan.Blobs[i].Work)
	}
	cctx, cancel := context.WithTimeout(ctx, j.o.CallTimeout)
	defer cancel()
	resp, err := j.scheds.Client(addr).Preheat(cctx, req)
	if err != nil {
		return fmt.Errorf("ask scheduler %s to preheat %d blobs: %s", addr, len(idx), rpcMessage(err))
	}
	seeds := resp.GetSeeds()
	missing := 0
	for k, i := range idx {
		if k < len(seeds) && seeds[k] != "" {
			j.status[i].Seed = seeds[k]
		} else {
			missing++
		}
	}
	if missing > 0 {
		return &NoSeedError{Scheduler: addr, Missing: missing, Total: len(idx)}
	}
	return nil
}

// Wait polls the schedulers until a seed holds every blob, asking again
// for blobs that stall. progress, when not nil, is called with a blob's
// index in the plan and its status whenever the status changes.
func (j *Job) Wait(ctx context.Context, progress func(i int, s Status)) error {
	if progress == nil {
		progress = func(int, Status) {}
	}
	addrs, by := j.bySched()
	lastFetched := make([]int32, len(j.status))
	lastChange := make([]time.Time, len(j.status))
	now := time.Now()
	for i := range lastChange {
		lastChange[i] = now
	}
	down := map[string]bool{}
	t := time.NewTicker(j.o.PollInterval)
	defer t.Stop()
	for {
		left := 0
		for _, addr := range addrs {
			var ids []string
			var pending []int
			for _, i := range by[addr] {
				if !j.status[i].Done {
					ids = append(ids, j.plan.Blobs[i].Work.TaskId)
					pending = append(pending, i)
				}
			}
			if len(ids) == 0 {
				continue
			}
			left += len(ids)
			cctx, cancel := context.WithTimeout(ctx, j.o.CallTimeout)
			resp, err := j.scheds.Client(addr).TaskStatus(cctx, &schedulerpb.TaskStatusRequest{TaskIds: ids})
			cancel()
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				// A restarting scheduler: keep asking, the seeds re-announce.
				if !down[addr] {
					j.o.Logger.Warn("scheduler does not answer; still waiting", "scheduler", addr, "err", err)
					down[addr] = true
				}
				continue
			}
			down[addr] = false
			states := map[string]*schedulerpb.TaskState{}
			for _, s := range resp.GetTasks() {
				states[s.GetTaskId()] = s
			}
			var stalled []int
			for _, i := range pending {
				st := &j.status[i]
				s := states[j.plan.Blobs[i].Work.TaskId]
				if s == nil {
					s = &schedulerpb.TaskState{}
				}
				changed := false
				if b := FetchedBytes(s, j.plan.Blobs[i].Size); b > st.Fetched {
					st.Fetched = b
					changed = true
				}
				if s.GetFetched() != lastFetched[i] {
					lastFetched[i] = s.GetFetched()
					lastChange[i] = time.Now()
				}
				if s.GetSeedsComplete() >= 1 {
					st.Done = true
					left--
					progress(i, *st)
					continue
				}
				if changed {
					progress(i, *st)
				}
				if time.Since(lastChange[i]) >= j.o.StallResend {
					stalled = append(stalled, i)
					lastChange[i] = time.Now()
				}
			}
			if len(stalled) > 0 {
				j.o.Logger.Info("blobs made no progress; asking the scheduler again", "scheduler", addr, "blobs", len(stalled))
				if err := j.enqueueAt(ctx, addr, stalled); err != nil {
					if ctx.Err() != nil {
						return ctx.Err()
					}
					// The seed died and no other is left: waiting is pointless.
					var nse *NoSeedError
					if errors.As(err, &nse) {
						return err
					}
					j.o.Logger.Warn("re-queue stalled blobs", "err", err)
				}
			}
		}
		if left == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// rpcMessage is the readable part of a gRPC error.
func rpcMessage(err error) string {
	if st, ok := status.FromError(err); ok {
		if st.Code() == codes.Unavailable {
			return "unreachable: " + st.Message()
		}
		return st.Code().String() + ": " + st.Message()
	}
	return err.Error()
}

// NoSeedError is a scheduler's answer that it knows no live seed peer.
type NoSeedError struct {
	Scheduler      string
	Missing, Total int
}

func (e *NoSeedError) Error() string {
	return fmt.Sprintf("no live seed peer at scheduler %s (%d of %d blobs not queued)", e.Scheduler, e.Missing, e.Total)
}

// FetchedBytes estimates the bytes a task's fetched pieces hold. The
// status carries the piece size; a scheduler that does not say it gets the
// size the piece count implies.
func FetchedBytes(s *schedulerpb.TaskState, size int64) int64 {
	length := s.GetLength()
	if length <= 0 {
		length = size
	}
	n := int64(s.GetPieces())
	if n <= 0 || length <= 0 {
		return 0
	}
	if s.GetSeedsComplete() >= 1 || int64(s.GetFetched()) >= n {
		return length
	}
	ps := s.GetPieceSize()
	if ps <= 0 || int64(piece.Count(length, ps)) != n {
		// Piece sizes are powers of two: the one that gives n pieces.
		ps = 1
		for ps < (length+n-1)/n {
			ps *= 2
		}
		if int64(piece.Count(length, ps)) != n {
			ps = (length + n - 1) / n
		}
	}
	return min(int64(s.GetFetched())*ps, length)
}
