package peer

import (
	"context"
	"sync"
	"time"
)

// flights are this peer's claimed origin range fetches in progress (and
// just ended), by task. The scheduler sends other readers of the same
// bytes here, and the upload server streams them as they land: concurrent
// readers of a range cost the origin one request, and none of them waits
// for another's fetch to end before its own bytes start to flow.
type flights struct {
	mu sync.Mutex
	m  map[string][]*flight
	// started is closed (and replaced) when a fetch starts.
	started chan struct{}
}

// flightAppear is how long a request for a range this peer was told to
// fetch waits for the fetch to start: the scheduler may send another
// reader here before this peer has read the scheduler's answer itself.
const flightAppear = 250 * time.Millisecond

// flightLinger keeps an ended fetch findable for a while: its bytes are
// written, and the reader that fetched them is verifying them, after
// which the range is held and served like any other.
const flightLinger = 5 * time.Second

// flightStall cuts a stream from a fetch that makes no progress: the
// reader at the other end then reads the rest from the registry itself.
const flightStall = time.Second

type flight struct {
	fs       *flights
	t        *task
	off, end int64

	mu    sync.Mutex
	pos   int64 // bytes before pos are written
	state int   // flightRunning, flightDone, flightFailed
	ended time.Time
	ch    chan struct{} // closed (and replaced) on progress and at the end
}

const (
	flightRunning = iota
	flightDone
	flightFailed
)

// start records a fetch of [off, end) of t that is about to begin.
func (fs *flights) start(t *task, off, end int64) *flight {
	fl := &flight{fs: fs, t: t, off: off, end: end, pos: off, ch: make(chan struct{})}
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if fs.m == nil {
		fs.m = map[string][]*flight{}
	}
	fs.pruneLocked(t.id, time.Now())
	fs.m[t.id] = append(fs.m[t.id], fl)
	if fs.started != nil {
		close(fs.started)
		fs.started = nil
	}
	return fl
}

// await is find, waiting up to flightAppear for such a fetch to start.
func (fs *flights) await(ctx context.Context, id string, off, end int64) *flight {
	timer := time.NewTimer(flightAppear)
	defer timer.Stop()
	for {
		if fl := fs.find(id, off, end); fl != nil {
			return fl
		}
		fs.mu.Lock()
		if fs.started == nil {
			fs.started = make(chan struct{})
		}
		ch := fs.started
		fs.mu.Unlock()
		if fl := fs.find(id, off, end); fl != nil {
			return fl
		}
		select {
		case <-ch:
		case <-timer.C:
			return nil
		case <-ctx.Done():
			return nil
		}
	}
}

// find returns a fetch of task id, running or just done, that covers
// [off, end).
func (fs *flights) find(id string, off, end int64) *flight {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.pruneLocked(id, time.Now())
	for _, fl := range fs.m[id] {
		fl.mu.Lock()
		ok := fl.state != flightFailed && fl.off <= off && end <= fl.end
		fl.mu.Unlock()
		if ok {
			return fl
		}
	}
	return nil
}

// pruneLocked forgets fetches of task id that failed or ended long ago. A
// fetch whose bytes were never verified (a corrupt origin answer, a reader
// gone) gives up its claim, so the scheduler stops sending readers here.
func (fs *flights) pruneLocked(id string, now time.Time) {
	list := fs.m[id]
	out := list[:0]
	for _, fl := range list {
		fl.mu.Lock()
		gone := fl.state != flightRunning && now.Sub(fl.ended) > flightLinger
		failed := fl.state == flightFailed
		fl.mu.Unlock()
		if !gone && !failed {
			out = append(out, fl)
			continue
		}
		if !failed && !fl.t.st.Covered(fl.off, fl.end-fl.off) {
			fl.t.p.reportRange(fl.t, fl.off, fl.end-fl.off, true)
		}
	}
	clear(list[len(out):])
	if len(out) == 0 {
		delete(fs.m, id)
	} else {
		fs.m[id] = out
	}
}

// advance records that the bytes before pos are written.
func (fl *flight) advance(pos int64) {
	fl.mu.Lock()
	defer fl.mu.Unlock()
	if pos > fl.pos && fl.state == flightRunning {
		fl.pos = pos
		close(fl.ch)
		fl.ch = make(chan struct{})
	}
}

// finish marks the fetch done (every byte written) or failed; a failed one
// gives up its claim at once.
func (fl *flight) finish(ok bool) {
	fl.mu.Lock()
	if fl.state != flightRunning {
		fl.mu.Unlock()
		return
	}
	fl.state, fl.ended = flightDone, time.Now()
	if !ok {
		fl.state = flightFailed
	}
	close(fl.ch)
	fl.ch = make(chan struct{})
	fl.mu.Unlock()
	if !ok {
		fl.t.p.reportRange(fl.t, fl.off, fl.end-fl.off, true)
		fl.fs.mu.Lock()
		fl.fs.pruneLocked(fl.t.id, time.Now())
		fl.fs.mu.Unlock()
	}
}

// wait returns how far the fetch has written once that is past cur. ok
// is false when it failed, stalled for flightStall, or ctx ended.
func (fl *flight) wait(ctx context.Context, cur int64) (pos int64, ok bool) {
	timer := time.NewTimer(flightStall)
	defer timer.Stop()
	for {
		fl.mu.Lock()
		pos, state, ch := fl.pos, fl.state, fl.ch
		fl.mu.Unlock()
		switch {
		case state == flightFailed:
			return pos, false
		case pos > cur:
			return pos, true
		case state == flightDone:
			return pos, false
		}
		select {
		case <-ch:
		case <-timer.C:
			return pos, false
		case <-ctx.Done():
			return pos, false
		}
	}
}
