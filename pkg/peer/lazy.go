package peer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-dev/starling/pkg/registry"
	"github.com/starling-dev/starling/pkg/taskid"
)

// Fetcher reads byte ranges of one blob. It has the method set of
// blob.Fetcher, so each satisfies the other without this package knowing
// the lazy-read code.
type Fetcher interface {
	// Fetch returns length bytes of the blob from off.
	Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error)
}

// ErrFetcherClosed is returned by Fetch after Close.
var ErrFetcherClosed = errors.New("peer: lazy fetcher closed")

var errSchedulerDown = errors.New("the scheduler does not answer")

// LazyFetcher reads ranges of one blob through the peer, so that a lazily
// mounted layer on one node leaves pieces that other nodes fetch from it.
// The task is opened on the first Fetch.
//
// The peer path is an optimisation, never a dependency: when it fails or
// is slow for a range, that read goes to direct (the registry) for
// exactly its range, and a circuit breaker sends the blob's next reads
// there too for LazyFallbackFor, then lets one read try the peer again. A
// failing scheduler opens one breaker for the whole peer instead (see
// lazyShared). Each opening is one log line and one count of
// starling_peer_lazy_fallback_total.
//
// Close releases the task, so that storage GC may collect it; readers
// still open keep it until they are closed. It is safe for concurrent use.
type LazyFetcher struct {
	p      *Peer
	req    Request
	direct Fetcher
	auth   func(context.Context) (string, error)
	brk    breaker

	mu      sync.Mutex
	d       *Download
	opening chan struct{} // closed when an Open in progress ends
	users   int           // Fetch calls and readers not yet closed
	closed  bool

	// smu guards the byte counts and the bytes written awaiting
	// verification (ranges.go).
	smu     sync.Mutex
	written byteSet
	bytes   map[string]int64
	wait    map[string]time.Duration
}

// LazyOption configures a LazyFetcher.
type LazyOption func(*LazyFetcher)

// WithAuthorization gives the lazy task the Authorization header auth
// returns ("" when the registry wants none), fetched when the task is
// opened: the task carries it to the scheduler, so that a seed or parent
// asked to fetch from the origin on this node's behalf is allowed to.
// An error sends the read to direct (reason "auth").
func WithAuthorization(auth func(ctx context.Context) (string, error)) LazyOption {
	return func(f *LazyFetcher) { f.auth = auth }
}

// NewLazyFetcher returns a Fetcher of the blob r names (TaskID, URL,
// Digest and Length should be set; for a registry blob the task ID is its
// digest). direct reads the blob without the peer; it is also the origin
// of the task when r.Source is nil, which needs r.Length.
func (p *Peer) NewLazyFetcher(r Request, direct Fetcher, opts ...LazyOption) *LazyFetcher {
	if r.Source == nil {
		r.Source = sizedSource{Fetcher: direct, size: r.Length}
	}
	r.Lazy = true
	f := &LazyFetcher{p: p, req: r, direct: direct, bytes: map[string]int64{}, wait: map[string]time.Duration{}}
	for _, o := range opts {
		o(f)
	}
	return f
}

// RegistryBlobRequest names a layer blob of repo as a task: the same task
// as the proxy's and preheat's for that blob of that registry
// (taskid.ForRegistryBlob), so that lazy reads find what a preheat or a
// mirror client fetched, and the other way round.
func RegistryBlobRequest(repo name.Repository, desc v1.Descriptor) Request {
	u := registry.BlobURL(repo, desc.Digest)
	id := desc.Digest.String()
	if pu, err := url.Parse(u); err == nil {
		if rid, ok := taskid.ForRegistryBlob(pu); ok {
			id = rid
		}
	}
	return Request{TaskID: id, URL: u, Digest: desc.Digest.String(), Length: desc.Size}
}

// sizedSource is a Source over a Fetcher whose blob size is known.
type sizedSource struct {
	Fetcher
	size int64
}

func (s sizedSource) Size(context.Context) (int64, error) {
	if s.size <= 0 {
		return 0, errors.New("blob size not known")
	}
	return s.size, nil
}

// Fetch returns length bytes of the blob from off: through the peer
// while that works, else from direct. It never waits past ctx.
func (f *LazyFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	f.mu.Lock()
	closed := f.closed
	f.mu.Unlock()
	if closed {
		return nil, ErrFetcherClosed
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	now := time.Now()
	if f.p.schedulerOpen(now) {
		return f.directRead(ctx, off, length, reasonScheduler)
	}
	ok, probe := f.brk.allow(now)
	if !ok {
		_, reason := f.brk.state()
		return f.directRead(ctx, off, length, reason)
	}
	rc, reason, trip, err := f.viaPeer(ctx, off, length)
	if err == nil {
		if f.brk.succeed(probe) {
			f.p.lazy.open.Dec()
			f.p.log.Info("peer path works again: lazy reads go through the peer", "blob", f.req.TaskID)
		}
		return rc, nil
	}
	if errors.Is(err, ErrFetcherClosed) || ctx.Err() != nil {
		f.brk.abandon(probe)
		return nil, err
	}
	if trip {
		f.fallback(reason, off, length, err, probe)
	} else {
		f.brk.abandon(probe)
	}
	return f.directRead(ctx, off, length, reason)
}

// reasonCorrupt is a range whose bytes, through the peer, failed the
// reader's own verification (a chunk digest of the layer's TOC).
const reasonCorrupt = "corrupt"

// FetchDirect reads the range from the registry, not through the peer:
// the reader calls it after bytes that came through the peer failed its
// verification, so that a corrupt parent or piece cannot fail the read.
// The blob's breaker opens, so its next reads skip the peer for a while.
func (f *LazyFetcher) FetchDirect(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	f.fallback(reasonCorrupt, off, length, errors.New("bytes through the peer failed verification"), false)
	return f.directRead(ctx, off, length, reasonCorrupt)
}

// directRead reads the range from direct, counting why.
func (f *LazyFetcher) directRead(ctx context.Context, off, length int64, reason string) (io.ReadCloser, error) {
	f.p.lazy.directReads.WithLabelValues(reason).Inc()
	start := time.Now()
	rc, err := f.direct.Fetch(ctx, off, length)
	if err != nil {
		return nil, err
	}
	return &countingReader{r: rc, c: rc, left: length, f: f, src: srcOrigin, start: start}, nil
}

// fallback opens the breaker that reason names (the peer-wide one for
// the scheduler) and, when that is a new event, logs it and counts it.
func (f *LazyFetcher) fallback(reason string, off, length int64, err error, probe bool) {
	period := f.p.o.LazyFallbackFor
	b := &f.brk
	if reason == reasonScheduler {
		// The blob's own probe, if this was one, proved nothing about it.
		f.brk.abandon(probe)
		b, probe = &f.p.lazy.sched, false
	}
	opened, wasClosed := b.trip(time.Now(), period, reason, probe)
	if !opened {
		return
	}
	if wasClosed {
		f.p.lazy.open.Inc()
	}
	f.p.lazy.fallbacks.WithLabelValues(reason).Inc()
	f.p.log.Warn("lazy read through the peer failed: reading the registry directly for "+period.String(),
		"blob", f.req.TaskID, "range", fmt.Sprintf("%d+%d", off, length), "reason", reason, "err", err)
}

// viaPeer reads the range through the peer within the budget. On failure
// it says why, and whether that should open a breaker.
//
// "Slow" is measured against what the registry would need for the same
// range. The peer path asks the scheduler, may wait on another peer's
// origin fetch of the same bytes (about as long as that fetch should
// take, see scheduler.ScheduleRange) and opens its segments' requests;
// LazyFallbackAfter (2s by default) bounds all of that, which is many
// origin round trips on any link where P2P pays. A peer path that cannot
// start a range within it is not worth a blocked reader: the read goes
// direct. Once started, the bytes stream; a segment that fails mid-way is
// finished from direct by lazyReader.
func (f *LazyFetcher) viaPeer(ctx context.Context, off, length int64) (_ io.ReadCloser, reason string, trip bool, _ error) {
	budget := f.p.o.LazyFallbackAfter
	cut := false
	if dl, ok := ctx.Deadline(); ok {
		// Leave the caller half of what remains for the direct read.
		if half := time.Until(dl) / 2; half < budget {
			budget, cut = half, true
		}
	}
	if f.p.schedulerDown() {
		return nil, reasonScheduler, true, errSchedulerDown
	}
	// The readers of the segments live on after viaPeer returns, so the
	// budget cancels their context only while they are being opened.
	octx, cancel := context.WithCancel(ctx)
	var late atomic.Bool
	timer := time.AfterFunc(budget, func() { late.Store(true); cancel() })
	fail := func(err error, dflt string) (io.ReadCloser, string, bool, error) {
		timer.Stop()
		cancel()
		switch {
		case authError(err):
			return nil, reasonAuth, true, err
		case f.p.schedulerDown():
			return nil, reasonScheduler, true, err
		case late.Load():
			// A budget cut short by the caller's deadline says little
			// about the peer: this read goes direct, the blob stays.
			return nil, reasonSlow, !cut, err
		}
		return nil, dflt, true, err
	}
	d, err := f.acquire(octx)
	if err != nil {
		return fail(err, reasonOpen)
	}
	if f.p.schedulerDown() { // found out while opening
		f.release()
		return fail(errSchedulerDown, reasonScheduler)
	}
	rc, err := f.openRange(octx, d, off, length)
	if err == nil && !timer.Stop() {
		// The budget ran out as the last segment opened.
		rc.Close()
		err = context.DeadlineExceeded
	}
	if err != nil {
		f.release()
		return fail(err, reasonFailed)
	}
	return &lazyReader{cur: rc, f: f, ctx: ctx, off: off, left: length, cancel: cancel}, "", false, nil
}

// acquire returns the open download, opening it first if need be, and
// counts a user. The lock is not held while the task is opened (which may
// ask the scheduler): other callers wait on f.opening, or their ctx.
func (f *LazyFetcher) acquire(ctx context.Context) (*Download, error) {
	f.mu.Lock()
	for {
		if f.closed {
			f.mu.Unlock()
			return nil, ErrFetcherClosed
		}
		if f.d != nil {
			f.users++
			d := f.d
			f.mu.Unlock()
			return d, nil
		}
		if f.opening == nil {
			break
		}
		ch := f.opening
		f.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		f.mu.Lock()
	}
	ch := make(chan struct{})
	f.opening = ch
	f.mu.Unlock()

	d, err := f.open(ctx)

	f.mu.Lock()
	defer f.mu.Unlock()
	f.opening = nil
	close(ch)
	if err != nil {
		// The next Fetch tries again: the failure may pass.
		return nil, fmt.Errorf("open task %s: %w", f.req.TaskID, err)
	}
	if f.closed {
		d.Close()
		return nil, ErrFetcherClosed
	}
	f.d = d
	f.users++
	return d, nil
}

// release drops a user; the last one after Close closes the download.
func (f *LazyFetcher) release() {
	f.mu.Lock()
	f.users--
	d := f.closeLocked()
	f.mu.Unlock()
	if d != nil {
		d.Close()
	}
}

// closeLocked hands over the download to close once closed and unused.
func (f *LazyFetcher) closeLocked() *Download {
	if !f.closed || f.users > 0 || f.d == nil {
		return nil
	}
	d := f.d
	f.d = nil
	return d
}

// Close releases the task once every reader Fetch returned is closed.
// Fetch fails afterwards. Close is idempotent.
func (f *LazyFetcher) Close() error {
	if f.brk.retire() {
		f.p.lazy.open.Dec()
	}
	f.mu.Lock()
	f.closed = true
	d := f.closeLocked()
	f.mu.Unlock()
	if d != nil {
		return d.Close()
	}
	return nil
}

// open opens the task with fresh credentials.
func (f *LazyFetcher) open(ctx context.Context) (*Download, error) {
	r := f.req
	if f.auth != nil {
		a, err := f.auth(ctx)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errNoAuth, err)
		}
		if a != "" {
			r.Header = r.Header.Clone()
			if r.Header == nil {
				r.Header = http.Header{}
			}
			r.Header.Set("Authorization", a)
		}
	}
	return f.p.Open(ctx, r)
}

// lazyReader streams a range the peer holds, and holds its fetcher's
// download until closed. Should the local copy fail mid-range (a task
// discarded after failing verification closes its file), the rest of the
// range comes from direct: the caller gets its bytes or an error, never
// a short or wrong range.
type lazyReader struct {
	cur       io.ReadCloser
	f         *LazyFetcher
	ctx       context.Context // the Fetch call's, for the direct rest
	off, left int64           // next byte and bytes still to come
	switched  bool
	once      sync.Once
	cancel    context.CancelFunc // ends the peer path's requests
}

func (r *lazyReader) Read(b []byte) (int, error) {
	if r.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(b)) > r.left {
		b = b[:r.left]
	}
	n, err := r.cur.Read(b)
	r.off += int64(n)
	r.left -= int64(n)
	if err == nil || r.left == 0 {
		return n, nil
	}
	if r.switched || r.ctx.Err() != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return n, err
	}
	r.switched = true
	r.f.fallback(reasonFailed, r.off, r.left, err, false)
	rc, derr := r.f.directRead(r.ctx, r.off, r.left, reasonFailed)
	if derr != nil {
		return n, fmt.Errorf("read %d bytes at %d of %s: peer copy: %w; registry: %w", r.left, r.off, r.f.req.TaskID, err, derr)
	}
	r.cur.Close()
	r.cur = rc
	r.once.Do(r.f.release)
	return n, nil
}

func (r *lazyReader) Close() error {
	err := r.cur.Close()
	if r.cancel != nil {
		r.cancel()
	}
	r.once.Do(r.f.release)
	return err
}
