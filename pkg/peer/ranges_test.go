package peer_test

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/peer"
)

// slowOrigin is a task's origin with a latency per request, counting the
// requests and bytes the whole cluster asked of it.
type slowOrigin struct {
	data     []byte
	latency  time.Duration
	requests atomic.Int64
	bytes    atomic.Int64
	mu       sync.Mutex
	asked    map[[2]int64]int
}

func (o *slowOrigin) Size(context.Context) (int64, error) { return int64(len(o.data)), nil }

func (o *slowOrigin) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	o.requests.Add(1)
	o.bytes.Add(length)
	o.mu.Lock()
	if o.asked == nil {
		o.asked = map[[2]int64]int{}
	}
	o.asked[[2]int64{off, length}]++
	o.mu.Unlock()
	select {
	case <-time.After(o.latency):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return io.NopCloser(bytes.NewReader(o.data[off : off+length])), nil
}

// chunksOf cuts n bytes into chunks of random sizes, as a TOC does.
func chunksOf(n int64, seed uint64) [][2]int64 {
	r := rand.New(rand.NewPCG(seed, seed))
	var out [][2]int64
	for off := int64(0); off < n; {
		l := min(1+r.Int64N(40<<10), n-off)
		out = append(out, [2]int64{off, l})
		off += l
	}
	return out
}

// The join, in one process: three nodes lazily read the same chunks at
// the same time through the peer; the origin is asked for each chunk
// once, and a fourth node afterwards takes everything from the others.
func TestLazyRangesOneOriginFetchPerChunk(t *testing.T) {
	noLeaks(t)
	addr, _ := testenv.StartScheduler(t)
	mb, digest := newMemBlob(t, 1<<20)
	origin := &slowOrigin{data: mb.data, latency: 20 * time.Millisecond}
	chunks := chunksOf(int64(len(mb.data)), 7)
	// Every node reads every other chunk: the bytes the cluster needs.
	var want [][2]int64
	var wantBytes int64
	for i, c := range chunks {
		if i%2 == 0 {
			want = append(want, c)
			wantBytes += c[1]
		}
	}
	req := peer.Request{TaskID: digest, Digest: digest, Length: int64(len(mb.data)), Source: origin}
	node := func() (*peer.LazyFetcher, *memBlob) {
		p := newPeer(t, peer.Options{Schedulers: []string{addr}, UploadListen: "127.0.0.1:0", Logger: quiet,
			AnnounceInterval: 100 * time.Millisecond})
		direct := &memBlob{data: mb.data}
		f := p.NewLazyFetcher(req, direct)
		t.Cleanup(func() { f.Close() })
		return f, direct
	}
	var wg sync.WaitGroup
	var directs []*memBlob
	for range 3 {
		f, direct := node()
		directs = append(directs, direct)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, c := range want {
				if got := readRange(t, f, c[0], c[1]); !bytes.Equal(got, mb.data[c[0]:c[0]+c[1]]) {
					t.Errorf("chunk %d+%d: wrong bytes", c[0], c[1])
					return
				}
			}
		}()
	}
	wg.Wait()
	for i, d := range directs {
		if n := d.calls.Load(); n != 0 {
			t.Errorf("node %d read the registry directly %d times", i, n)
		}
	}
	if n := origin.requests.Load(); n > int64(len(want)) {
		t.Errorf("%d origin requests for %d distinct chunks", n, len(want))
		for r, k := range origin.asked {
			if k > 1 {
				t.Logf("range %d+%d asked %d times", r[0], r[1], k)
			}
		}
	}
	if b := origin.bytes.Load(); float64(b) > 1.05*float64(wantBytes) {
		t.Errorf("the origin sent %d bytes, %.2fx the %d bytes needed", b, float64(b)/float64(wantBytes), wantBytes)
	}
	t.Logf("3 nodes: %d origin requests, %d bytes for %d chunks, %d bytes", origin.requests.Load(), origin.bytes.Load(), len(want), wantBytes)

	// A fourth node: nothing from the origin, everything from peers.
	before := origin.requests.Load()
	f4, direct4 := node()
	for _, c := range want {
		if got := readRange(t, f4, c[0], c[1]); !bytes.Equal(got, mb.data[c[0]:c[0]+c[1]]) {
			t.Fatalf("fourth node, chunk %d+%d: wrong bytes", c[0], c[1])
		}
	}
	if n := origin.requests.Load() - before; n != 0 || direct4.calls.Load() != 0 {
		t.Errorf("the fourth node asked the origin %d times and the registry %d times", n, direct4.calls.Load())
	}
	if got := f4.BytesBySource()["peer"]; got != wantBytes {
		t.Errorf("the fourth node got %d bytes from peers, want %d (sources %v)", got, wantBytes, f4.BytesBySource())
	}
}

// A claimed fetch that is abandoned half-way (its reader went) gives up
// its claim at once: the next reader of those bytes fetches them itself,
// and nobody is offered the half that was written.
func TestLazyRangesAbandonedFetchReleasesClaim(t *testing.T) {
	addr, _ := testenv.StartScheduler(t)
	mb, digest := newMemBlob(t, 256<<10)
	origin := &slowOrigin{data: mb.data}
	req := peer.Request{TaskID: digest, Digest: digest, Length: int64(len(mb.data)), Source: origin}
	pa := newPeer(t, peer.Options{Schedulers: []string{addr}, UploadListen: "127.0.0.1:0", Logger: quiet})
	fa := pa.NewLazyFetcher(req, &memBlob{data: mb.data})
	defer fa.Close()
	rc, err := fa.Fetch(context.Background(), 1000, 50000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(rc, make([]byte, 100)); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	pb := newPeer(t, peer.Options{Schedulers: []string{addr}, UploadListen: "127.0.0.1:0", Logger: quiet})
	fb := pb.NewLazyFetcher(req, &memBlob{data: mb.data})
	defer fb.Close()
	if got := readRange(t, fb, 1000, 50000); !bytes.Equal(got, mb.data[1000:51000]) {
		t.Fatal("wrong bytes")
	}
	if src := fb.BytesBySource(); src["peer"] != 0 || src["origin"] != 50000 {
		t.Fatalf("bytes of an abandoned fetch were served: sources %v", src)
	}
}
