package peer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/byterange"
	"github.com/starling-dev/starling/pkg/storage"
)

// The lazy path reads exact byte ranges, not pieces. A lazily mounted
// layer asks for a chunk (or a few neighbouring ones); a piece holds many
// small-file chunks nobody asked for, and every read would wait for a
// whole piece through the origin link. So a range read:
//   - serves what this peer holds at once;
//   - asks the scheduler for the rest, which answers with segments: held
//     by live peers (fetched from one with an HTTP Range request on its
//     upload server), or nobody's (fetched from the origin, exactly that
//     segment, claimed so that other readers in the cluster wait for it
//     instead of fetching it too — but only about as long as the fetch
//     should take: see scheduler.ScheduleRange);
//   - writes what it fetched to the task's file, and marks it held only
//     once the layer's reader has verified it against the TOC (Verified):
//     a peer never offers bytes nobody has checked.

// rangePath is where the upload server serves byte ranges of a task.
const rangePath = "/ranges/"

// segment is one part of a range read and where it comes from.
type segment struct {
	off, n  int64
	parents []*schedulerpb.PeerInfo
	claimed bool // this peer holds the scheduler's origin claim on it
}

// Source names, in stats and metrics.
const (
	srcLocal  = "local"
	srcPeer   = "peer"
	srcOrigin = "origin"
)

// openRange returns a reader of [off, off+n) of the task, assembled from
// its segments; every segment's request is under way when it returns.
func (f *LazyFetcher) openRange(ctx context.Context, d *Download, off, n int64) (io.ReadCloser, error) {
	t := d.t
	start := time.Now()
	if t.st.Covered(off, n) {
		return f.localReader(t, off, n, start), nil
	}
	segs, err := f.p.scheduleRange(ctx, t, off, n)
	if err != nil {
		return nil, err
	}
	rcs := make([]io.ReadCloser, len(segs))
	errs := make([]error, len(segs))
	if len(segs) == 1 {
		rcs[0], errs[0] = f.openSegment(ctx, t, segs[0], start)
	} else {
		var wg sync.WaitGroup
		for i, s := range segs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rcs[i], errs[i] = f.openSegment(ctx, t, s, start)
			}()
		}
		wg.Wait()
	}
	if err := errors.Join(errs...); err != nil {
		for _, rc := range rcs {
			if rc != nil {
				rc.Close()
			}
		}
		return nil, err
	}
	if len(rcs) == 1 {
		return rcs[0], nil
	}
	return &multiReadCloser{rcs: rcs}, nil
}

// scheduleRange asks the task's scheduler where to get a range; without a
// scheduler the whole range is the origin's.
func (p *Peer) scheduleRange(ctx context.Context, t *task, off, n int64) ([]segment, error) {
	if p.sched == nil {
		return []segment{{off: off, n: n}}, nil
	}
	addr, cl := p.sched.Pick(t.id)
	if cl == nil {
		return nil, fmt.Errorf("no client for scheduler %s", addr)
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := cl.ScheduleRange(cctx, &schedulerpb.ScheduleRangeRequest{
		PeerId: p.id, TaskId: t.id, Length: t.length,
		Range: &schedulerpb.ByteRange{Offset: off, Length: n},
	})
	if err != nil {
		if ctx.Err() == nil {
			p.sched.setUp(false, fmt.Errorf("schedule range of task %s with scheduler %s: %w", t.id, addr, err))
		}
		return nil, fmt.Errorf("schedule range %d+%d of task %s: %w", off, n, t.id, err)
	}
	// The segments must tile the range exactly: anything else is a
	// scheduler bug or a bad answer, and the read goes to the registry.
	// Each segment is read at once, in parallel: their number is bounded.
	if k := len(resp.GetSegments()); k > maxSegments {
		return nil, fmt.Errorf("schedule range %d+%d of task %s: scheduler %s answered %d segments, at most %d",
			off, n, t.id, addr, k, maxSegments)
	}
	var segs []segment
	pos := off
	for _, s := range resp.GetSegments() {
		r := s.GetRange()
		if r.GetOffset() != pos || r.GetLength() <= 0 || r.GetOffset()+r.GetLength() > off+n {
			return nil, fmt.Errorf("schedule range %d+%d of task %s: scheduler %s answered a segment %d+%d out of place",
				off, n, t.id, addr, r.GetOffset(), r.GetLength())
		}
		var parents []*schedulerpb.PeerInfo
		for _, par := range s.GetParents() {
			if len(parents) == maxAnsweredParents {
				break
			}
			if par.GetId() != p.id && validParent(par) {
				parents = append(parents, par)
			}
		}
		segs = append(segs, segment{off: pos, n: r.GetLength(), parents: parents, claimed: s.GetBackToSource()})
		pos += r.GetLength()
	}
	if pos != off+n {
		return nil, fmt.Errorf("schedule range %d+%d of task %s: scheduler %s answered up to %d", off, n, t.id, addr, pos)
	}
	return segs, nil
}

// maxSegments bounds the segments of one range answer (the scheduler sends
// at most 257).
const maxSegments = 1024

// openSegment starts reading one segment: locally, from a parent, or
// from the origin (when no parent answers, too).
func (f *LazyFetcher) openSegment(ctx context.Context, t *task, s segment, start time.Time) (io.ReadCloser, error) {
	if t.st.Covered(s.off, s.n) {
		return f.localReader(t, s.off, s.n, start), nil
	}
	for _, par := range s.parents {
		rc, err := f.p.openParentRange(ctx, par, t.id, s.off, s.n)
		if err == nil {
			return f.storeReader(t, rc, s, srcPeer, start), nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		f.p.log.Debug("range from parent failed", "task", t.id, "range", fmt.Sprintf("%d+%d", s.off, s.n),
			"parent", par.GetId(), "err", err)
	}
	var fl *flight
	if s.claimed {
		// Others are sent here for these bytes from now on: the upload
		// server streams them as they arrive.
		fl = f.p.flights.start(t, s.off, s.off+s.n)
	}
	rc, err := t.src.Fetch(ctx, s.off, s.n)
	if err != nil {
		if fl != nil {
			fl.finish(false)
		}
		return nil, fmt.Errorf("fetch range %d+%d of %s from the origin: %w", s.off, s.n, t.id, err)
	}
	r := f.storeReader(t, rc, s, srcOrigin, start)
	r.fl = fl
	return r, nil
}

// openParentRange asks a parent's upload server for a byte range.
func (p *Peer) openParentRange(ctx context.Context, par *schedulerpb.PeerInfo, taskID string, off, n int64) (io.ReadCloser, error) {
	u := p.parentURL(par, rangePath+url.PathEscape(taskID))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	resp, err := p.rangeClient.Do(req)
	if err != nil {
		return nil, err
	}
	switch {
	case resp.StatusCode == http.StatusServiceUnavailable:
		resp.Body.Close()
		return nil, errBusy
	case resp.StatusCode != http.StatusPartialContent:
		resp.Body.Close()
		return nil, fmt.Errorf("%s: %s", u, resp.Status)
	case resp.ContentLength != n:
		resp.Body.Close()
		return nil, fmt.Errorf("%s: %d bytes for a %d-byte range", u, resp.ContentLength, n)
	}
	return resp.Body, nil
}

// localReader reads held bytes of the task.
func (f *LazyFetcher) localReader(t *task, off, n int64, start time.Time) io.ReadCloser {
	return &countingReader{r: io.NewSectionReader(t.st, off, n), left: n, f: f, src: srcLocal, start: start}
}

// storeReader streams a fetched segment to its reader and into the task's
// file; the bytes are remembered as written, to be marked held when the
// layer's reader has verified them.
func (f *LazyFetcher) storeReader(t *task, rc io.ReadCloser, s segment, src string, start time.Time) *countingReader {
	return &countingReader{r: rc, c: rc, left: s.n, f: f, src: src, start: start, t: t, off: s.off, pos: s.off, store: true}
}

// countingReader counts a segment's bytes and wait by source and, for a
// fetched one, writes it through to the task's file.
type countingReader struct {
	r     io.Reader
	c     io.Closer
	left  int64
	f     *LazyFetcher
	src   string
	start time.Time
	t     *task
	store bool
	off   int64 // the segment's start
	pos   int64 // next byte to write
	bad   bool  // a write failed: do not offer the segment
	done  bool
	fl    *flight // the claimed origin fetch others stream from, or nil
}

func (r *countingReader) Read(b []byte) (int, error) {
	if r.left <= 0 {
		r.finish()
		return 0, io.EOF
	}
	if int64(len(b)) > r.left {
		b = b[:r.left]
	}
	n, err := r.r.Read(b)
	if n > 0 {
		r.left -= int64(n)
		if r.store && !r.bad {
			if werr := r.t.st.WriteRange(b[:n], r.pos); werr != nil {
				// A full disk loses the sharing of these bytes, not the read.
				r.bad = true
				r.f.p.log.Debug("keep range", "task", r.t.id, "err", werr)
				if r.fl != nil {
					r.fl.finish(false)
				}
			} else {
				// Before the caller sees them: it verifies (and calls
				// Verified) chunk by chunk as they arrive.
				r.f.wrote(r.pos, r.pos+int64(n))
			}
		}
		r.pos += int64(n)
		if r.fl != nil && !r.bad {
			r.fl.advance(r.pos)
		}
		r.f.count(r.src, int64(n))
	}
	if r.left == 0 {
		if r.c != nil && err == nil {
			// Read the body's end too: an HTTP body closed before its EOF
			// was seen costs its connection, and with TLS a handshake per
			// range.
			var end [1]byte
			_, _ = r.r.Read(end[:])
		}
		r.finish()
		return n, nil
	}
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// finish runs once the segment's last byte is read.
func (r *countingReader) finish() {
	if r.done {
		return
	}
	r.done = true
	r.f.waited(r.src, time.Since(r.start))
	if r.fl != nil {
		r.fl.finish(!r.bad)
	}
}

func (r *countingReader) Close() error {
	if r.fl != nil && !r.done {
		r.fl.finish(false)
	}
	if r.c != nil {
		return r.c.Close()
	}
	return nil
}

// multiReadCloser reads its parts in order and closes them all.
type multiReadCloser struct {
	rcs []io.ReadCloser
	i   int
}

func (m *multiReadCloser) Read(b []byte) (int, error) {
	for m.i < len(m.rcs) {
		n, err := m.rcs[m.i].Read(b)
		if errors.Is(err, io.EOF) {
			m.i++
			err = nil
		}
		if n > 0 || err != nil {
			return n, err
		}
	}
	return 0, io.EOF
}

func (m *multiReadCloser) Close() error {
	var errs []error
	for _, rc := range m.rcs {
		errs = append(errs, rc.Close())
	}
	return errors.Join(errs...)
}

// wrote remembers fetched bytes that wait for verification.
func (f *LazyFetcher) wrote(off, end int64) {
	f.smu.Lock()
	f.written.Add(off, end)
	f.smu.Unlock()
}

// Verified tells the fetcher that the layer's reader checked [off,
// off+n) against its digests: bytes of it this peer fetched are now
// held, served to other peers and reported to the scheduler. Bytes it
// did not write (read from the registry directly) are left alone.
func (f *LazyFetcher) Verified(off, n int64) {
	f.mu.Lock()
	d := f.d
	f.mu.Unlock()
	if d == nil || n <= 0 {
		return
	}
	f.smu.Lock()
	ok := f.written.Covers(off, off+n)
	f.smu.Unlock()
	if !ok {
		return
	}
	if err := d.t.st.MarkRange(off, n); err != nil {
		f.p.log.Debug("mark range held", "task", d.t.id, "err", err)
		return
	}
	f.p.reportRange(d.t, off, n, false)
}

func (f *LazyFetcher) count(src string, n int64) {
	f.smu.Lock()
	f.bytes[src] += n
	f.smu.Unlock()
	f.p.lazy.bytes.WithLabelValues(src).Add(float64(n))
}

func (f *LazyFetcher) waited(src string, d time.Duration) {
	f.smu.Lock()
	f.wait[src] += d
	f.smu.Unlock()
	f.p.lazy.wait.WithLabelValues(src).Add(d.Seconds())
}

// BytesBySource is how many bytes Fetch returned, by where they came
// from: "local" (this node's peer storage), "peer" or "origin" (the
// registry, through the peer path or directly).
func (f *LazyFetcher) BytesBySource() map[string]int64 {
	f.smu.Lock()
	defer f.smu.Unlock()
	out := make(map[string]int64, len(f.bytes))
	for k, v := range f.bytes {
		out[k] = v
	}
	return out
}

// WaitBySource is how long reads waited for their bytes, by source.
func (f *LazyFetcher) WaitBySource() map[string]time.Duration {
	f.smu.Lock()
	defer f.smu.Unlock()
	out := make(map[string]time.Duration, len(f.wait))
	for k, v := range f.wait {
		out[k] = v
	}
	return out
}

// rangeReport is a range held (or a claim released) to tell the scheduler.
type rangeReport struct {
	task     string
	length   int64
	off, n   int64
	released bool
}

// reportRange queues a report; the report loop sends what piled up in one
// call per task, so a reader marking chunk after chunk costs few calls.
func (p *Peer) reportRange(t *task, off, n int64, released bool) {
	if p.sched == nil {
		return
	}
	select {
	case p.reports <- rangeReport{task: t.id, length: t.length, off: off, n: n, released: released}:
	default:
		// Too many queued: the next heartbeat sends everything held.
		p.sched.mu.Lock()
		for a := range p.sched.synced {
			p.sched.synced[a] = false
		}
		p.sched.mu.Unlock()
	}
}

// reportLoop sends queued range reports until ctx ends.
func (p *Peer) reportLoop(ctx context.Context) {
	for {
		var batch []rangeReport
		select {
		case <-ctx.Done():
			return
		case r := <-p.reports:
			batch = append(batch, r)
		}
	drain:
		for len(batch) < 1024 {
			select {
			case r := <-p.reports:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		byTask := map[string]*schedulerpb.ReportRangesRequest{}
		var order []string
		for _, r := range batch {
			req := byTask[r.task]
			if req == nil {
				req = &schedulerpb.ReportRangesRequest{PeerId: p.id, TaskId: r.task, Length: r.length}
				byTask[r.task] = req
				order = append(order, r.task)
			}
			br := &schedulerpb.ByteRange{Offset: r.off, Length: r.n}
			if r.released {
				req.Released = append(req.Released, br)
			} else {
				req.Held = append(req.Held, br)
			}
		}
		for _, id := range order {
			addr, cl := p.sched.Pick(id)
			if cl == nil {
				continue
			}
			cctx, cancel := context.WithTimeout(ctx, callTimeout)
			_, err := cl.ReportRanges(cctx, byTask[id])
			cancel()
			if err != nil && ctx.Err() == nil {
				p.sched.mu.Lock()
				p.sched.synced[addr] = false
				p.sched.mu.Unlock()
				p.log.Debug("report ranges", "task", id, "scheduler", addr, "err", err)
			}
		}
	}
}

// flushLoop writes the ranges marked held to the task metadata every
// second, so that a restarted peer still serves them. It runs apart from
// the reports: a commit waits for fsync, and readers elsewhere may be
// waiting for a report.
func (p *Peer) flushLoop(ctx context.Context) {
	tick := time.NewTicker(rangePersistEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		p.mu.Lock()
		sts := make([]*storage.Task, 0, len(p.tasks))
		for _, t := range p.tasks {
			sts = append(sts, t.st)
		}
		p.mu.Unlock()
		for _, st := range sts {
			if err := st.FlushRanges(false); err != nil {
				p.log.Debug("save ranges", "task", st.ID(), "err", err)
			}
		}
	}
}

// rangePersistEvery is how often held ranges are written to disk.
const rangePersistEvery = time.Second

// byteSet is the set of bytes a fetcher wrote and awaits verification of.
type byteSet = byterange.Set
