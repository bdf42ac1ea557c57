package peer_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"google.golang.org/grpc"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/scheduler"
)

// originSource is a task's origin over the same bytes as the direct
// fetcher, counted apart from it: what the peer path asks of the origin
// never shows as a direct read. Size and Fetch can be made to fail or to
// hang until the peer stops.
type originSource struct {
	*memBlob
	sizeCalls, fetchCalls atomic.Int64
	sizeFail, hang        atomic.Bool
}

func (s *originSource) Size(context.Context) (int64, error) {
	s.sizeCalls.Add(1)
	if s.sizeFail.Load() {
		return 0, errors.New("origin says no")
	}
	return int64(len(s.data)), nil
}

func (s *originSource) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	s.fetchCalls.Add(1)
	if s.hang.Load() {
		<-ctx.Done() // the peer's own context: it ends with the peer
		return nil, ctx.Err()
	}
	return io.NopCloser(bytes.NewReader(s.data[off : off+length])), nil
}

// rangeLog records the ranges a direct fetcher was asked for.
type rangeLog struct {
	*memBlob
	mu     sync.Mutex
	ranges [][2]int64
}

func (r *rangeLog) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	r.mu.Lock()
	r.ranges = append(r.ranges, [2]int64{off, length})
	r.mu.Unlock()
	return r.memBlob.Fetch(ctx, off, length)
}

func (r *rangeLog) got() [][2]int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][2]int64(nil), r.ranges...)
}

// logBuf collects a peer's log lines.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuf) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), s)
}

const fallbackLine = "reading the registry directly for"

func gauge(t *testing.T, g prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			var sum float64
			for _, m := range mf.GetMetric() {
				sum += m.GetGauge().GetValue()
			}
			return sum
		}
	}
	return 0
}

func fetchCtx(t *testing.T, ctx context.Context, f peer.Fetcher, off, n int64) []byte {
	t.Helper()
	rc, err := f.Fetch(ctx, off, n)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// noLeaks checks, after every cleanup registered later (the peers'
// Close), that the test left no goroutine behind.
func noLeaks(t *testing.T) {
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) })
}

// A task that cannot open: the read gets its exact range from the
// registry, the breaker opens (one log line, one count), the next read
// does not touch the peer path, and after the breaker period one read
// tries the peer again and closes it.
func TestLazyBreakerOpensAndRecovers(t *testing.T) {
	noLeaks(t)
	reg := prometheus.NewRegistry()
	logs := &logBuf{}
	p := newPeer(t, peer.Options{PieceSize: 64 << 10, Registerer: reg,
		Logger: slog.New(slog.NewTextHandler(logs, nil)), LazyFallbackFor: 100 * time.Millisecond})
	mb, digest := newMemBlob(t, 300<<10)
	direct := &rangeLog{memBlob: mb}
	src := &originSource{memBlob: mb}
	src.sizeFail.Store(true)
	// No length: opening the task asks the origin, which fails.
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Source: src}, direct)
	defer f.Close()

	if got := readRange(t, f, 1000, 500); !bytes.Equal(got, mb.data[1000:1500]) {
		t.Fatal("first read: wrong bytes")
	}
	if got := readRange(t, f, 200<<10, 4096); !bytes.Equal(got, mb.data[200<<10:200<<10+4096]) {
		t.Fatal("second read: wrong bytes")
	}
	if n := src.sizeCalls.Load(); n != 1 {
		t.Errorf("the peer path was tried %d times; the open breaker should have stopped the second", n)
	}
	if got := direct.got(); len(got) != 2 || got[0] != [2]int64{1000, 500} || got[1] != [2]int64{200 << 10, 4096} {
		t.Errorf("direct reads %v, want exactly the two ranges", got)
	}
	if n := testenv.Counter(t, reg, "starling_peer_lazy_fallback_total", "reason", "open"); n != 1 {
		t.Errorf("fallback_total{reason=open} = %v, want 1", n)
	}
	if n := testenv.Counter(t, reg, "starling_peer_lazy_direct_reads_total", "reason", "open"); n != 2 {
		t.Errorf("direct_reads_total{reason=open} = %v, want 2", n)
	}
	if g := gauge(t, reg, "starling_peer_lazy_breakers_open"); g != 1 {
		t.Errorf("breakers open = %v, want 1", g)
	}
	if n := logs.count(fallbackLine); n != 1 {
		t.Errorf("%d fallback log lines, want 1:\n%s", n, logs.String())
	}
	if peer.HeldTask(p, digest) {
		t.Fatal("a task is open although it could not be")
	}

	// Half-open after the period: one read goes through the peer.
	time.Sleep(150 * time.Millisecond)
	src.sizeFail.Store(false)
	if got := readRange(t, f, 70<<10, 100); !bytes.Equal(got, mb.data[70<<10:70<<10+100]) {
		t.Fatal("read after the breaker period: wrong bytes")
	}
	if n := src.sizeCalls.Load(); n != 2 {
		t.Errorf("after the breaker period the peer path was tried %d more times, want 1", n-1)
	}
	if len(direct.got()) != 2 || src.fetchCalls.Load() == 0 {
		t.Errorf("the probe read did not go through the peer (direct %v, origin fetches %d)", direct.got(), src.fetchCalls.Load())
	}
	if !peer.HeldTask(p, digest) {
		t.Error("the task is not open after a read through the peer")
	}
	if g := gauge(t, reg, "starling_peer_lazy_breakers_open"); g != 0 {
		t.Errorf("breakers open = %v after a good probe, want 0", g)
	}
}

// A probe that fails reopens the breaker: a second event.
func TestLazyBreakerProbeFailsReopens(t *testing.T) {
	reg := prometheus.NewRegistry()
	p := newPeer(t, peer.Options{PieceSize: 64 << 10, Registerer: reg, Logger: quiet, LazyFallbackFor: 50 * time.Millisecond})
	mb, digest := newMemBlob(t, 100<<10)
	src := &originSource{memBlob: mb}
	src.sizeFail.Store(true)
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Source: src}, mb)
	readRange(t, f, 0, 10)
	time.Sleep(80 * time.Millisecond)
	if got := readRange(t, f, 10, 10); !bytes.Equal(got, mb.data[10:20]) {
		t.Fatal("wrong bytes")
	}
	if n := testenv.Counter(t, reg, "starling_peer_lazy_fallback_total", "reason", "open"); n != 2 || src.sizeCalls.Load() != 2 {
		t.Errorf("fallbacks %v, peer tries %d; want 2 and 2", n, src.sizeCalls.Load())
	}
	if g := gauge(t, reg, "starling_peer_lazy_breakers_open"); g != 1 {
		t.Errorf("breakers open = %v, want 1", g)
	}
	f.Close()
	if g := gauge(t, reg, "starling_peer_lazy_breakers_open"); g != 0 {
		t.Errorf("breakers open = %v after Close, want 0", g)
	}
}

// A scheduler that does not answer opens one breaker for the whole peer:
// reads of every blob go to the registry for their exact ranges, the task
// never fetches whole pieces from the origin, and once the scheduler is
// back (after the period) reads go through the peer again.
func TestLazySchedulerDownIsPeerWide(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens: the scheduler is down
	reg := prometheus.NewRegistry()
	logs := &logBuf{}
	p := newPeer(t, peer.Options{Schedulers: []string{addr}, PieceSize: 64 << 10, Registerer: reg,
		AnnounceInterval: 50 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(logs, nil)),
		LazyFallbackFor: 100 * time.Millisecond})
	var srcs []*originSource
	var fs []*peer.LazyFetcher
	var blobs []*memBlob
	for range 2 {
		mb, digest := newMemBlob(t, 256<<10)
		src := &originSource{memBlob: mb}
		f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Length: int64(len(mb.data)), Source: src}, mb)
		defer f.Close()
		srcs, fs, blobs = append(srcs, src), append(fs, f), append(blobs, mb)
	}
	for i := range 3 {
		for k, f := range fs {
			off := int64(i) * 70 << 10
			if got := readRange(t, f, off, 1000); !bytes.Equal(got, blobs[k].data[off:off+1000]) {
				t.Fatalf("blob %d at %d: wrong bytes", k, off)
			}
		}
	}
	for k, src := range srcs {
		if n := src.fetchCalls.Load(); n != 0 {
			t.Errorf("blob %d: %d whole pieces fetched from the origin with the scheduler down", k, n)
		}
		if n := blobs[k].calls.Load(); n != 3 {
			t.Errorf("blob %d: %d direct reads, want 3", k, n)
		}
	}
	if n := testenv.Counter(t, reg, "starling_peer_lazy_fallback_total", "reason", "scheduler"); n != 1 {
		t.Errorf("fallback_total{reason=scheduler} = %v, want 1 for the whole peer", n)
	}
	if n := logs.count(fallbackLine); n != 1 {
		t.Errorf("%d fallback log lines, want 1", n)
	}
	if g := gauge(t, reg, "starling_peer_lazy_breakers_open"); g != 1 {
		t.Errorf("breakers open = %v, want 1", g)
	}

	// The scheduler comes back at its address.
	l, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("cannot listen at %s again: %v", addr, err)
	}
	srv, err := scheduler.NewServer(scheduler.New(scheduler.Options{}), scheduler.ServerOptions{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	srv.RegisterGRPC(g)
	go func() { _ = g.Serve(l) }()
	defer g.Stop()
	deadline := time.Now().Add(15 * time.Second)
	for gauge(t, reg, "starling_peer_scheduler_up") != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the peer does not reach the scheduler again")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(120 * time.Millisecond) // the breaker period is over
	before := blobs[0].calls.Load()
	if got := readRange(t, fs[0], 200<<10, 1000); !bytes.Equal(got, blobs[0].data[200<<10:200<<10+1000]) {
		t.Fatal("read with the scheduler back: wrong bytes")
	}
	if blobs[0].calls.Load() != before || srcs[0].fetchCalls.Load() == 0 {
		t.Errorf("with the scheduler back the read did not go through the peer (direct %d -> %d, origin pieces %d)",
			before, blobs[0].calls.Load(), srcs[0].fetchCalls.Load())
	}
	if g := gauge(t, reg, "starling_peer_lazy_breakers_open"); g != 0 {
		t.Errorf("breakers open = %v with the scheduler back, want 0", g)
	}
}

// A peer path that hangs (here: the origin behind the peer; a hung parent
// or scheduler looks the same to the reader) gives way to the registry
// within the budget, and the next read does not wait at all.
func TestLazySlowPeerFallsBackWithinBudget(t *testing.T) {
	noLeaks(t)
	reg := prometheus.NewRegistry()
	p := newPeer(t, peer.Options{PieceSize: 64 << 10, Registerer: reg, Logger: quiet,
		LazyFallbackAfter: 200 * time.Millisecond})
	mb, digest := newMemBlob(t, 256<<10)
	src := &originSource{memBlob: mb}
	src.hang.Store(true)
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Length: int64(len(mb.data)), Source: src}, mb)
	defer f.Close()

	start := time.Now()
	if got := readRange(t, f, 5000, 300); !bytes.Equal(got, mb.data[5000:5300]) {
		t.Fatal("wrong bytes")
	}
	if d := time.Since(start); d < 200*time.Millisecond || d > 1500*time.Millisecond {
		t.Errorf("the slow read took %v, want about the 200ms budget", d)
	}
	tries := src.fetchCalls.Load()
	start = time.Now()
	if got := readRange(t, f, 100<<10, 300); !bytes.Equal(got, mb.data[100<<10:100<<10+300]) {
		t.Fatal("wrong bytes")
	}
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Errorf("the read after the fallback took %v: it waited on the peer", d)
	}
	if src.fetchCalls.Load() != tries {
		t.Error("the read after the fallback asked the peer path")
	}
	if n := testenv.Counter(t, reg, "starling_peer_lazy_fallback_total", "reason", "slow"); n != 1 {
		t.Errorf("fallback_total{reason=slow} = %v, want 1", n)
	}
}

// The caller's deadline bounds everything: with less time than the
// budget, half of it goes to the peer and the rest to the registry, and
// a budget cut short by the caller does not condemn the blob.
func TestLazyFetchHonoursCallerDeadline(t *testing.T) {
	reg := prometheus.NewRegistry()
	p := newPeer(t, peer.Options{PieceSize: 64 << 10, Registerer: reg, Logger: quiet, LazyFallbackAfter: time.Hour})
	mb, digest := newMemBlob(t, 128<<10)
	src := &originSource{memBlob: mb}
	src.hang.Store(true)
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Length: int64(len(mb.data)), Source: src}, mb)
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 400*time.Millisecond)
	defer cancel()
	start := time.Now()
	if got := fetchCtx(t, ctx, f, 10, 10); !bytes.Equal(got, mb.data[10:20]) {
		t.Fatal("wrong bytes")
	}
	if d := time.Since(start); d > 400*time.Millisecond {
		t.Errorf("Fetch took %v, past the caller's 400ms", d)
	}
	if n := testenv.Counter(t, reg, "starling_peer_lazy_fallback_total", "", ""); n != 0 {
		t.Errorf("%v fallbacks counted for a budget the caller cut", n)
	}
	if n := testenv.Counter(t, reg, "starling_peer_lazy_direct_reads_total", "reason", "slow"); n != 1 {
		t.Errorf("direct_reads_total{reason=slow} = %v, want 1", n)
	}
}

// authOrigin serves data to requests that carry the right Authorization
// and answers 401 to the others, counting both.
type authOrigin struct {
	data        []byte
	want        string
	ok, refused atomic.Int64
}

func (o *authOrigin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != o.want {
		o.refused.Add(1)
		w.Header().Set("WWW-Authenticate", `Bearer realm="test"`)
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	o.ok.Add(1)
	http.ServeContent(w, r, "blob", time.Time{}, bytes.NewReader(o.data))
}

// A 401 behind the peer (a task whose origin fetch lacks the credentials)
// sends the read to the registry at once, not after the budget; a lazy
// fetcher that brings credentials makes the same task work.
func TestLazyAuthRefusalFallsBackAtOnce(t *testing.T) {
	reg := prometheus.NewRegistry()
	p := newPeer(t, peer.Options{PieceSize: 64 << 10, Registerer: reg, Logger: quiet, LazyFallbackAfter: 10 * time.Second})
	mb, digest := newMemBlob(t, 200<<10)
	origin := &authOrigin{data: mb.data, want: "Bearer good"}
	srv := httptest.NewServer(origin)
	defer srv.Close()
	req := peer.Request{TaskID: digest, URL: srv.URL + "/v2/x/blobs/" + digest, Digest: digest, Length: int64(len(mb.data))}
	// The task exists already, opened without credentials (as the proxy
	// or an old resume would): its origin is the URL.
	d, err := p.Open(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	f := p.NewLazyFetcher(req, mb)
	defer f.Close()
	start := time.Now()
	if got := readRange(t, f, 1000, 100); !bytes.Equal(got, mb.data[1000:1100]) {
		t.Fatal("wrong bytes")
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("the read waited %v on a 401", d)
	}
	if origin.refused.Load() == 0 {
		t.Fatal("the origin was never asked through the peer")
	}
	if n := testenv.Counter(t, reg, "starling_peer_lazy_fallback_total", "reason", "auth"); n != 1 {
		t.Errorf("fallback_total{reason=auth} = %v, want 1", n)
	}

	// Credentials that cannot be had: the registry directly, reason auth.
	fNo := p.NewLazyFetcher(req, mb, peer.WithAuthorization(func(context.Context) (string, error) {
		return "", errors.New("keychain says no")
	}))
	defer fNo.Close()
	if got := readRange(t, fNo, 0, 10); !bytes.Equal(got, mb.data[:10]) {
		t.Fatal("wrong bytes")
	}
	if n := testenv.Counter(t, reg, "starling_peer_lazy_fallback_total", "reason", "auth"); n != 2 {
		t.Errorf("fallback_total{reason=auth} = %v, want 2", n)
	}

	// With the credentials the same task reads through the peer.
	fAuth := p.NewLazyFetcher(req, mb, peer.WithAuthorization(func(context.Context) (string, error) {
		return "Bearer good", nil
	}))
	defer fAuth.Close()
	directBefore := mb.calls.Load()
	if got := readRange(t, fAuth, 150<<10, 100); !bytes.Equal(got, mb.data[150<<10:150<<10+100]) {
		t.Fatal("wrong bytes")
	}
	if mb.calls.Load() != directBefore || origin.ok.Load() == 0 {
		t.Errorf("with credentials the read did not go through the peer (direct %d -> %d, authorized origin requests %d)",
			directBefore, mb.calls.Load(), origin.ok.Load())
	}
}

// A task a lazy fetcher created is not resumed as a full download after a
// restart; its pieces stay for serving. A task wanted whole later is.
func TestLazyTaskNotResumedAfterRestart(t *testing.T) {
	mb, digest := newMemBlob(t, 512<<10)
	origin := &authOrigin{data: mb.data}
	srv := httptest.NewServer(origin)
	defer srv.Close()
	req := peer.Request{TaskID: digest, URL: srv.URL + "/v2/x/blobs/" + digest, Digest: digest, Length: int64(len(mb.data))}
	root := t.TempDir()
	opts := peer.Options{Root: root, PieceSize: 64 << 10, Logger: quiet}

	p1, err := peer.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := p1.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	f := p1.NewLazyFetcher(req, mb, peer.WithAuthorization(func(context.Context) (string, error) { return "Bearer secret", nil }))
	if got := readRange(t, f, 100<<10, 1000); !bytes.Equal(got, mb.data[100<<10:100<<10+1000]) {
		t.Fatal("wrong bytes")
	}
	f.Close()
	p1.Close()
	if n := origin.ok.Load() + origin.refused.Load(); n != 0 {
		t.Fatalf("the lazy task asked the URL %d times; its origin is the direct fetcher", n)
	}
	if b, err := readAllFiles(filepath.Join(root, "requests")); err != nil || strings.Contains(b, "secret") {
		t.Errorf("a lazy task's credentials were written to disk (%v)", err)
	}

	p2, err := peer.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := p2.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if n := origin.ok.Load() + origin.refused.Load(); n != 0 {
		t.Fatalf("the restarted peer fetched %d times from the origin: the lazy task was resumed", n)
	}
	d, err := p2.Open(context.Background(), peer.Request{TaskID: digest, URL: req.URL, Digest: digest, Length: req.Length, Lazy: true})
	if err != nil {
		t.Fatal(err)
	}
	f2 := p2.NewLazyFetcher(req, mb)
	calls := mb.calls.Load()
	if got := readRange(t, f2, 100<<10+10, 100); !bytes.Equal(got, mb.data[100<<10+10:100<<10+110]) {
		t.Fatal("wrong bytes after the restart")
	}
	if mb.calls.Load() != calls {
		t.Error("the lazy task's bytes are gone after the restart")
	}
	f2.Close()
	// Now someone wants it whole (a full open joins the lazy task): a
	// restart finishes it.
	full, err := p2.Open(context.Background(), peer.Request{TaskID: digest, URL: req.URL, Digest: digest})
	if err != nil {
		t.Fatal(err)
	}
	full.Close()
	d.Close()
	p2.Close()
	p3 := newPeer(t, opts)
	deadline := time.Now().Add(10 * time.Second)
	for {
		d, err := p3.Open(context.Background(), peer.Request{TaskID: digest, URL: req.URL, Digest: digest})
		if err != nil {
			t.Fatal(err)
		}
		done, total := d.Progress()
		d.Close()
		if done == total {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the task wanted whole was not resumed: %d of %d bytes", done, total)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func readAllFiles(dir string) (string, error) {
	var sb strings.Builder
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return "", err
		}
		sb.Write(b)
	}
	return sb.String(), nil
}

// ghostParent makes the scheduler believe peer id at port holds every
// piece of the blob, without a peer behind it.
func ghostParent(t *testing.T, s *scheduler.Scheduler, id string, port int, digest string, data []byte, psize int64) {
	t.Helper()
	held := scheduler.HeldTask{TaskID: digest, Length: int64(len(data)), PieceSize: psize, Pieces: map[int]string{}}
	for n := 0; int64(n)*psize < int64(len(data)); n++ {
		end := min(int64(n+1)*psize, int64(len(data)))
		s := sha256.Sum256(data[int64(n)*psize : end])
		held.Pieces[n] = hex.EncodeToString(s[:])
	}
	s.AnnounceFull(scheduler.Peer{ID: id, IP: "127.0.0.1", UploadPort: port, Capacity: 8}, []scheduler.HeldTask{held})
}

// Parents that fail: a dead one (nothing listens) costs the peer path a
// refused connection and the task takes the piece from the origin itself,
// within the budget; a hung one (accepts, never answers) leaves the range
// late, so the read goes to the registry within the budget and the blob's
// breaker opens.
func TestLazyParentFailures(t *testing.T) {
	addr, srv := testenv.StartScheduler(t)
	const psize = 64 << 10
	reg := prometheus.NewRegistry()
	p := newPeer(t, peer.Options{Schedulers: []string{addr}, PieceSize: psize, Registerer: reg, Logger: quiet,
		AnnounceInterval: 100 * time.Millisecond, PieceTimeout: time.Minute, LazyFallbackAfter: 500 * time.Millisecond})

	t.Run("dead", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		mb, digest := newMemBlob(t, 256<<10)
		ghostParent(t, srv.Scheduler(), "dead-parent", port, digest, mb.data, psize)
		src := &originSource{memBlob: mb}
		f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Length: int64(len(mb.data)), Source: src}, mb)
		defer f.Close()
		if got := readRange(t, f, 70<<10, 1000); !bytes.Equal(got, mb.data[70<<10:70<<10+1000]) {
			t.Fatal("wrong bytes")
		}
		if src.fetchCalls.Load() == 0 && mb.calls.Load() == 0 {
			t.Fatal("the range came from nowhere")
		}
		t.Logf("dead parent: %d origin pieces through the peer, %d direct reads", src.fetchCalls.Load(), mb.calls.Load())
	})

	t.Run("hung", func(t *testing.T) {
		var asked atomic.Int64
		release := make(chan struct{})
		hung := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			asked.Add(1)
			select {
			case <-r.Context().Done():
			case <-release:
			}
		}))
		defer hung.Close()
		defer close(release)
		port := hung.Listener.Addr().(*net.TCPAddr).Port
		mb, digest := newMemBlob(t, 256<<10)
		ghostParent(t, srv.Scheduler(), "hung-parent", port, digest, mb.data, psize)
		src := &originSource{memBlob: mb}
		f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Length: int64(len(mb.data)), Source: src}, mb)
		defer f.Close()
		start := time.Now()
		if got := readRange(t, f, 130<<10, 1000); !bytes.Equal(got, mb.data[130<<10:130<<10+1000]) {
			t.Fatal("wrong bytes")
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("the read took %v with a 500ms budget", d)
		}
		if asked.Load() == 0 {
			t.Error("the hung parent was never asked")
		}
		if n := testenv.Counter(t, reg, "starling_peer_lazy_fallback_total", "reason", "slow"); n != 1 {
			t.Errorf("fallback_total{reason=slow} = %v, want 1", n)
		}
		if mb.calls.Load() != 1 {
			t.Errorf("%d direct reads, want 1", mb.calls.Load())
		}
	})
}

// A range handed out from the peer's copy that fails mid-read (the task
// was discarded: the whole blob did not match its digest) is finished
// from the registry: the reader gets the right bytes, not an error or a
// short range.
func TestLazyReaderFinishesFromRegistry(t *testing.T) {
	reg := prometheus.NewRegistry()
	logs := &logBuf{}
	p := newPeer(t, peer.Options{PieceSize: 64 << 10, Registerer: reg, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	mb, digest := newMemBlob(t, 128<<10)
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Length: int64(len(mb.data))}, mb)
	defer f.Close()
	// Held and verified: the next read of it streams from the task's file.
	readRange(t, f, 100, 50<<10)
	calls := mb.calls.Load()
	rc, err := f.Fetch(context.Background(), 100, 50<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if mb.calls.Load() != calls {
		t.Fatal("a held range went to the origin")
	}
	// The task goes (GC, failed verification) under the open reader.
	peer.DiscardTask(p, digest)
	got, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, mb.data[100:100+50<<10]) {
		t.Fatalf("read %d bytes across the discard; wrong bytes", len(got))
	}
	if n := testenv.Counter(t, reg, "starling_peer_lazy_fallback_total", "reason", "failed"); n != 1 {
		t.Errorf("fallback_total{reason=failed} = %v, want 1", n)
	}
}
