package blob

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	"go.uber.org/goleak"

	"github.com/starling-dev/starling/pkg/chunkcache"
)

// memFetcher serves a blob from memory and counts requests: the seam where
// the registry or a peer sits, not a stand-in for either.
type memFetcher struct {
	blob     []byte
	requests atomic.Int64
	delay    time.Duration
	hang     bool
}

func (m *memFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	m.requests.Add(1)
	if m.hang {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	time.Sleep(m.delay)
	return io.NopCloser(bytes.NewReader(m.blob[off : off+length])), nil
}

// blobOf gzips each chunk as its own stream, as eStargz does.
func blobOf(t *testing.T, chunks ...[]byte) ([]byte, []Chunk) {
	var buf bytes.Buffer
	var out []Chunk
	for _, c := range chunks {
		start := int64(buf.Len())
		zw := gzip.NewWriter(&buf)
		zw.Write(c)
		zw.Close()
		out = append(out, Chunk{Offset: start, End: int64(buf.Len()), Size: int64(len(c)), Digest: digest.FromBytes(c).String()})
	}
	return buf.Bytes(), out
}

func newTestReader(t *testing.T, f Fetcher) *Reader {
	c, err := chunkcache.Open(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	r := NewReader(f, c, Options{Layer: "test", Decompressor: new(estargz.GzipDecompressor), FetchTimeout: 500 * time.Millisecond})
	t.Cleanup(r.Close)
	return r
}

func TestAdjacentChunksOneRequest(t *testing.T) {
	blob, cs := blobOf(t, []byte("one"), []byte("two"), []byte("three"))
	f := &memFetcher{blob: blob}
	r := newTestReader(t, f)
	if err := r.Ensure(context.Background(), cs); err != nil {
		t.Fatal(err)
	}
	if f.requests.Load() != 1 {
		t.Fatalf("%d requests for three adjacent chunks", f.requests.Load())
	}
	p := make([]byte, 3)
	if n, err := r.ReadAt(context.Background(), cs[2], p, 2); err != nil || string(p[:n]) != "ree" {
		t.Fatalf("%q %v", p[:n], err)
	}
	if f.requests.Load() != 1 {
		t.Fatal("a cached chunk was fetched again")
	}
}

func TestConcurrentReadsFetchOnce(t *testing.T) {
	blob, cs := blobOf(t, bytes.Repeat([]byte("x"), 100000))
	f := &memFetcher{blob: blob, delay: 50 * time.Millisecond}
	r := newTestReader(t, f)
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, 10)
			if _, err := r.ReadAt(context.Background(), cs[0], p, 500); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if f.requests.Load() != 1 {
		t.Fatalf("%d fetches for one chunk read 16 times at once", f.requests.Load())
	}
}

func TestMismatchFetchedTwiceThenFails(t *testing.T) {
	blob, cs := blobOf(t, []byte("real content"))
	cs[0].Digest = digest.FromString("something else").String()
	f := &memFetcher{blob: blob}
	r := newTestReader(t, f)
	err := r.Ensure(context.Background(), cs)
	if !errors.Is(err, ErrVerify) {
		t.Fatalf("want ErrVerify, got %v", err)
	}
	if f.requests.Load() != 2 || r.Stats().VerifyFailures != 2 {
		t.Fatalf("%d fetches, %d failures; want the chunk fetched once more", f.requests.Load(), r.Stats().VerifyFailures)
	}
}

func TestDeadSourceTimesOut(t *testing.T) {
	blob, cs := blobOf(t, []byte("never"))
	r := newTestReader(t, &memFetcher{blob: blob, hang: true})
	done := make(chan error, 1)
	go func() { done <- r.Ensure(context.Background(), cs) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("want a deadline error, got %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a fetch from a dead source hung")
	}
}

func TestDuplicateChunksInOneRead(t *testing.T) {
	blob, cs := blobOf(t, []byte("same"), []byte("other"))
	r := newTestReader(t, &memFetcher{blob: blob})
	done := make(chan error, 1)
	go func() { done <- r.Ensure(context.Background(), []Chunk{cs[0], cs[1], cs[0]}) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a read naming one chunk twice deadlocked")
	}
}

// flakyFetcher fails its first n fetches.
type flakyFetcher struct {
	memFetcher
	fail atomic.Int64
}

func (f *flakyFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	if f.fail.Add(-1) >= 0 {
		f.requests.Add(1)
		return nil, errors.New("connection reset by peer")
	}
	return f.memFetcher.Fetch(ctx, off, length)
}

func TestTransientErrorRetried(t *testing.T) {
	blob, cs := blobOf(t, []byte("retry me"))
	f := &flakyFetcher{memFetcher: memFetcher{blob: blob}}
	f.fail.Store(1)
	r := newTestReader(t, f)
	p := make([]byte, 8)
	if n, err := r.ReadAt(context.Background(), cs[0], p, 0); err != nil || string(p[:n]) != "retry me" {
		t.Fatalf("%q %v", p[:n], err)
	}
	if f.requests.Load() != 2 {
		t.Fatalf("%d requests, want a failed one and a retry", f.requests.Load())
	}
}

// TestCancelEndsWait: a reader whose request is cancelled stops waiting at
// once, even though the fetch it started goes on for others.
func TestCancelEndsWait(t *testing.T) {
	blob, cs := blobOf(t, []byte("slow"))
	r := NewReader(&memFetcher{blob: blob, hang: true}, newStore(t), Options{Layer: "test", Decompressor: new(estargz.GzipDecompressor), FetchTimeout: time.Hour})
	defer r.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Ensure(ctx, cs) }()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("want context.Canceled, got %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a cancelled read kept waiting")
	}
}

// TestCloseEndsEverything: Close ends waits and fetches and leaves no goroutine.
func TestCloseEndsEverything(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	blob, cs := blobOf(t, []byte("a"), []byte("b"))
	r := NewReader(&memFetcher{blob: blob, hang: true}, newStore(t), Options{Layer: "test", Decompressor: new(estargz.GzipDecompressor), FetchTimeout: time.Hour})
	done := make(chan error, 2)
	go func() { done <- r.Ensure(context.Background(), cs[:1]) }()
	r.ReadAhead(cs[1:])
	// WaitIdle blocks while the demand read waits, and ends with Close.
	idle := make(chan error, 1)
	go func() {
		time.Sleep(20 * time.Millisecond)
		idle <- r.WaitIdle(context.Background())
	}()
	time.Sleep(50 * time.Millisecond)
	r.Close()
	for _, ch := range []chan error{done, idle} {
		select {
		case err := <-ch:
			if !errors.Is(err, ErrClosed) {
				t.Fatalf("want ErrClosed, got %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close left a wait hanging")
		}
	}
	if err := r.Ensure(context.Background(), cs); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after Close: %v", err)
	}
}

func TestWaitIdleHonoursCancel(t *testing.T) {
	blob, cs := blobOf(t, []byte("a"))
	r := NewReader(&memFetcher{blob: blob, hang: true}, newStore(t), Options{Layer: "test", Decompressor: new(estargz.GzipDecompressor), FetchTimeout: time.Hour})
	defer r.Close()
	go r.Ensure(context.Background(), cs)
	for r.waitingDemand() == 0 {
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := r.WaitIdle(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want the deadline, got %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("WaitIdle took %v after its context ended", d)
	}
}

// forgetfulStore loses a chunk the first time it is read, as an eviction
// between fetch and read would.
type forgetfulStore struct {
	Store
	mu     sync.Mutex
	forgot map[string]bool
}

func (s *forgetfulStore) ReadAt(d string, p []byte, off int64) (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.forgot[d] && s.Store.Has(d) {
		s.forgot[d] = true
		s.Store.(interface{ Remove(string) error }).Remove(d)
		return 0, false
	}
	return s.Store.ReadAt(d, p, off)
}

func TestEvictedChunkFetchedAgain(t *testing.T) {
	blob, cs := blobOf(t, []byte("come back"))
	f := &memFetcher{blob: blob}
	st := &forgetfulStore{Store: newStore(t), forgot: map[string]bool{}}
	r := NewReader(f, st, Options{Layer: "test", Decompressor: new(estargz.GzipDecompressor)})
	defer r.Close()
	if err := r.Ensure(context.Background(), cs); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 9)
	if n, err := r.ReadAt(context.Background(), cs[0], p, 0); err != nil || string(p[:n]) != "come back" {
		t.Fatalf("%q %v", p[:n], err)
	}
	if f.requests.Load() != 2 {
		t.Fatalf("%d requests, want the evicted chunk fetched again", f.requests.Load())
	}
}

// gatedFetcher sends the bytes of a range up to gate, then waits for open.
type gatedFetcher struct {
	blob []byte
	gate int64
	open chan struct{}
}

func (g *gatedFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	b := g.blob[off : off+length]
	cut := min(max(g.gate-off, 0), length)
	return io.NopCloser(io.MultiReader(bytes.NewReader(b[:cut]), gateReader{g.open, bytes.NewReader(b[cut:])})), nil
}

type gateReader struct {
	open chan struct{}
	r    io.Reader
}

func (g gateReader) Read(p []byte) (int, error) {
	<-g.open
	return g.r.Read(p)
}

// TestReadWaitsOnlyForItsChunk: a reader of the first chunk of a long run
// that someone else is fetching gets it as soon as its bytes are in.
func TestReadWaitsOnlyForItsChunk(t *testing.T) {
	blob, cs := blobOf(t, []byte("first"), bytes.Repeat([]byte("rest"), 1000))
	g := &gatedFetcher{blob: blob, gate: cs[0].End, open: make(chan struct{})}
	r := NewReader(g, newStore(t), Options{Layer: "test", Decompressor: new(estargz.GzipDecompressor), FetchTimeout: time.Minute})
	defer r.Close()
	defer close(g.open)
	go r.Prefetch(context.Background(), cs)
	p := make([]byte, 5)
	done := make(chan error, 1)
	go func() {
		_, err := r.ReadAt(context.Background(), cs[0], p, 0)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil || string(p) != "first" {
			t.Fatalf("%q %v", p, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the read of the first chunk waited for the whole run")
	}
}

func newStore(t *testing.T) Store {
	c, err := chunkcache.Open(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// fullStore refuses every chunk, as a full disk would.
type fullStore struct{ Store }

func (fullStore) Put(string, []byte) error { return syscall.ENOSPC }

// TestFullStoreStillServes: a chunk the store cannot keep is served from
// the verified bytes in hand, not failed.
func TestFullStoreStillServes(t *testing.T) {
	blob, cs := blobOf(t, []byte("no room"))
	r := NewReader(&memFetcher{blob: blob}, fullStore{newStore(t)}, Options{Layer: "test", Decompressor: new(estargz.GzipDecompressor)})
	defer r.Close()
	p := make([]byte, 7)
	if n, err := r.ReadAt(context.Background(), cs[0], p, 0); err != nil || string(p[:n]) != "no room" {
		t.Fatalf("%q %v", p[:n], err)
	}
}

// TestFailureRememberedBriefly: right after a chunk's fetch gave up, a read
// of it fails at once instead of waiting out another timeout; a moment
// later it is fetched again.
func TestFailureRememberedBriefly(t *testing.T) {
	blob, cs := blobOf(t, []byte("later"))
	f := &flakyFetcher{memFetcher: memFetcher{blob: blob}}
	f.fail.Store(3)
	r := NewReader(f, newStore(t), Options{Layer: "test", Decompressor: new(estargz.GzipDecompressor), Attempts: 3})
	defer r.Close()
	if err := r.Ensure(context.Background(), cs); err == nil {
		t.Fatal("three failed attempts succeeded")
	}
	n := f.requests.Load()
	if err := r.Ensure(context.Background(), cs); err == nil || f.requests.Load() != n {
		t.Fatalf("a read right after the failure: %v, %d more requests", err, f.requests.Load()-n)
	}
	time.Sleep(failMemory + 100*time.Millisecond)
	if err := r.Ensure(context.Background(), cs); err != nil {
		t.Fatalf("after the failure's memory passed: %v", err)
	}
}

// corruptingPeer gives corrupt bytes on its peer path and right ones from
// the origin directly.
type corruptingPeer struct {
	memFetcher
	direct atomic.Int64
}

func (c *corruptingPeer) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	c.requests.Add(1)
	b := append([]byte(nil), c.blob[off:off+length]...)
	for i := range b {
		b[i] ^= 0x55
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

func (c *corruptingPeer) FetchDirect(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	c.direct.Add(1)
	return c.memFetcher.Fetch(ctx, off, length)
}

// TestCorruptPeerRefetchedFromOrigin: a chunk that arrives corrupted
// through the peer is caught by its digest and fetched from the origin
// itself; the reader gets the right bytes.
func TestCorruptPeerRefetchedFromOrigin(t *testing.T) {
	blob, cs := blobOf(t, []byte("the real bytes"))
	f := &corruptingPeer{memFetcher: memFetcher{blob: blob}}
	r := newTestReader(t, f)
	p := make([]byte, 14)
	if n, err := r.ReadAt(context.Background(), cs[0], p, 0); err != nil || string(p[:n]) != "the real bytes" {
		t.Fatalf("%q %v", p[:n], err)
	}
	if f.direct.Load() != 1 || r.Stats().VerifyFailures != 1 {
		t.Fatalf("%d direct fetches, %d verify failures; want the corrupt chunk caught once and fetched from the origin", f.direct.Load(), r.Stats().VerifyFailures)
	}
}
