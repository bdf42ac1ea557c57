package blob

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

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
	return NewReader(f, c, Options{Layer: "test", Decompressor: new(estargz.GzipDecompressor), FetchTimeout: 500 * time.Millisecond})
}

func TestAdjacentChunksOneRequest(t *testing.T) {
	blob, cs := blobOf(t, []byte("one"), []byte("two"), []byte("three"))
	f := &memFetcher{blob: blob}
	r := newTestReader(t, f)
	if err := r.Ensure(context.Background(), cs, true); err != nil {
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
	err := r.Ensure(context.Background(), cs, true)
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
	go func() { done <- r.Ensure(context.Background(), cs, true) }()
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
	go func() { done <- r.Ensure(context.Background(), []Chunk{cs[0], cs[1], cs[0]}, true) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a read naming one chunk twice deadlocked")
	}
}
