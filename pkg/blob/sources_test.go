package blob

import (
	"bytes"
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/starling-dev/starling/pkg/originq"
)

// prioFetcher records the origin priority each request was made at.
type prioFetcher struct {
	memFetcher
	mu  sync.Mutex
	got map[int64]originq.Priority // by offset
}

func (f *prioFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	f.mu.Lock()
	if f.got == nil {
		f.got = map[int64]originq.Priority{}
	}
	f.got[off] = originq.PriorityFrom(ctx)
	f.mu.Unlock()
	return f.memFetcher.Fetch(ctx, off, length)
}

func (f *prioFetcher) at(off int64) (originq.Priority, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.got[off]
	return p, ok
}

// Each kind of fetch goes to the origin link at its priority: demand reads
// Demand, the prioritized region and read-ahead Prefetch, background
// fetch Background.
func TestFetchPriorities(t *testing.T) {
	blob, cs := blobOf(t, []byte("demand"), []byte("prefetch"), []byte("background"), []byte("read-ahead"), []byte("read"))
	f := &prioFetcher{memFetcher: memFetcher{blob: blob}}
	r := newTestReader(t, f)
	ctx := context.Background()
	if err := r.Ensure(ctx, cs[:1]); err != nil {
		t.Fatal(err)
	}
	if err := r.Prefetch(ctx, cs[1:2]); err != nil {
		t.Fatal(err)
	}
	if err := r.Background(ctx, cs[2:3]); err != nil {
		t.Fatal(err)
	}
	r.ReadAhead(cs[3:4])
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok := f.at(cs[3].Offset); ok || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	p := make([]byte, 4)
	if _, err := r.ReadAt(ctx, cs[4], p, 0); err != nil {
		t.Fatal(err)
	}
	for i, want := range []originq.Priority{originq.Demand, originq.Prefetch, originq.Background, originq.Prefetch, originq.Demand} {
		if got, ok := f.at(cs[i].Offset); !ok || got != want {
			t.Errorf("chunk %d fetched at %v (%v), want %v", i, got, ok, want)
		}
	}
}

// A demand read that needs a chunk background fetch claimed raises that
// fetch to Demand while it waits for an origin slot, instead of waiting
// behind the background work.
func TestDemandRaisesBackgroundFetch(t *testing.T) {
	blob, cs := blobOf(t, bytes.Repeat([]byte("b"), 1000))
	gate := originq.New(1)
	hold, err := gate.Acquire(context.Background(), "reg", originq.Demand)
	if err != nil {
		t.Fatal(err)
	}
	f := &prioFetcher{memFetcher: memFetcher{blob: blob}}
	r := newTestReader(t, originq.Fetcher(gate, "reg", f))
	r.o.FetchTimeout = 5 * time.Second
	bg := make(chan error, 1)
	go func() { bg <- r.Background(context.Background(), cs) }()
	waitQueue := func(p originq.Priority) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			if _, q := gate.InFlight("reg"); q[p] == 1 {
				return
			}
			if time.Now().After(deadline) {
				_, q := gate.InFlight("reg")
				t.Fatalf("queued %v, want one %v", q, p)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitQueue(originq.Background)
	rd := make(chan error, 1)
	go func() { rd <- r.Ensure(context.Background(), cs) }()
	waitQueue(originq.Demand)
	hold()
	if err := <-rd; err != nil {
		t.Fatal(err)
	}
	if err := <-bg; err != nil {
		t.Fatal(err)
	}
	if p, _ := f.at(cs[0].Offset); p != originq.Demand || f.requests.Load() != 1 {
		t.Fatalf("fetched at %v in %d requests, want once at demand", p, f.requests.Load())
	}
}

// A fetcher that does not say where its bytes came from is the origin:
// the Reader counts its bytes and wait; reads the store answers are cache.
func TestSourcesOrigin(t *testing.T) {
	blob, cs := blobOf(t, []byte("one"), []byte("two"))
	f := &memFetcher{blob: blob, delay: 20 * time.Millisecond}
	r := newTestReader(t, Counted(f))
	ctx := context.Background()
	if err := r.Ensure(ctx, cs); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 3)
	if n, err := r.ReadAt(ctx, cs[1], p, 0); err != nil || n != 3 {
		t.Fatal(n, err)
	}
	rc, err := r.FetchRange(ctx, 0, 4)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, rc)
	rc.Close()
	st := r.Stats().Sources
	if got := st[SourceOrigin].Bytes; got != int64(len(blob))+4 {
		t.Errorf("origin bytes %d, want %d", got, len(blob)+4)
	}
	if w := st[SourceOrigin].WaitSeconds; w < 0.04 || w > 5 {
		t.Errorf("origin wait %vs, want two requests of 20ms", w)
	}
	if st[SourceCache].Bytes != 3 {
		t.Errorf("cache bytes %d, want 3", st[SourceCache].Bytes)
	}
	if st[SourcePeer].Bytes != 0 || st[SourceLocal].Bytes != 0 || len(st) != 4 {
		t.Errorf("sources %v", st)
	}
}

// sourcedFetcher says where its bytes came from.
type sourcedFetcher struct {
	memFetcher
}

func (s *sourcedFetcher) BytesBySource() map[string]int64 {
	return map[string]int64{"local": 10, "peer": 200, "origin": 3000}
}

func (s *sourcedFetcher) WaitBySource() map[string]time.Duration {
	return map[string]time.Duration{"peer": 2 * time.Second, "origin": 500 * time.Millisecond}
}

// A fetcher with SourceStats is believed, through the Counted wrapper, and
// its bytes are not counted again as the origin's.
func TestSourcesFromFetcher(t *testing.T) {
	blob, cs := blobOf(t, []byte("one"), []byte("two"))
	f := &sourcedFetcher{memFetcher{blob: blob}}
	r := newTestReader(t, Counted(f))
	ctx := context.Background()
	if err := r.Ensure(ctx, cs); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 3)
	if _, err := r.ReadAt(ctx, cs[0], p, 0); err != nil {
		t.Fatal(err)
	}
	st := r.Stats().Sources
	want := map[string]SourceCount{
		SourceCache:  {Bytes: 3},
		SourceLocal:  {Bytes: 10},
		SourcePeer:   {Bytes: 200, WaitSeconds: 2},
		SourceOrigin: {Bytes: 3000, WaitSeconds: 0.5},
	}
	if len(st) != len(want) {
		t.Fatalf("sources %v", st)
	}
	for k, w := range want {
		if st[k] != w {
			t.Errorf("%s: %+v, want %+v", k, st[k], w)
		}
	}
}
