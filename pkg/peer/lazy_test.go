package peer_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-dev/starling/pkg/peer"
)

// memBlob is a direct Fetcher over bytes in memory that counts its calls.
type memBlob struct {
	data  []byte
	calls atomic.Int64
	fail  atomic.Bool
}

func (m *memBlob) Fetch(_ context.Context, off, length int64) (io.ReadCloser, error) {
	m.calls.Add(1)
	if m.fail.Load() {
		return nil, errors.New("origin down")
	}
	if off < 0 || off+length > int64(len(m.data)) {
		return nil, fmt.Errorf("range %d+%d outside %d bytes", off, length, len(m.data))
	}
	return io.NopCloser(bytes.NewReader(m.data[off : off+length])), nil
}

func newMemBlob(t *testing.T, size int) (*memBlob, string) {
	t.Helper()
	data := make([]byte, size)
	_, _ = rand.Read(data)
	s := sha256.Sum256(data)
	return &memBlob{data: data}, "sha256:" + hex.EncodeToString(s[:])
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func standalonePeer(t *testing.T) *peer.Peer {
	return newPeer(t, peer.Options{PieceSize: 64 << 10, Logger: quiet})
}

func readRange(t *testing.T, f peer.Fetcher, off, n int64) []byte {
	t.Helper()
	rc, err := f.Fetch(context.Background(), off, n)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	// As the layer's reader does once the chunk's digest matched.
	if v, ok := f.(interface{ Verified(off, n int64) }); ok {
		v.Verified(off, n)
	}
	return b
}

func waitReleased(t *testing.T, p *peer.Peer, id string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for peer.HeldTask(p, id) {
		if time.Now().After(deadline) {
			t.Fatalf("task %s still held after its fetcher closed", id)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestLazyFetcherReadsThroughThePeer(t *testing.T) {
	p := standalonePeer(t)
	blob, digest := newMemBlob(t, 300<<10)
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, URL: "http://reg.invalid/v2/x/blobs/" + digest, Digest: digest, Length: int64(len(blob.data))}, blob)

	if got := readRange(t, f, 70<<10, 1000); !bytes.Equal(got, blob.data[70<<10:70<<10+1000]) {
		t.Fatal("first range: wrong bytes")
	}
	before := blob.calls.Load()
	if before == 0 {
		t.Fatal("the task's origin is the direct fetcher, and it was not asked")
	}
	// Bytes of the range read and verified come from the peer's storage.
	if got := readRange(t, f, 70<<10+10, 100); !bytes.Equal(got, blob.data[70<<10+10:70<<10+110]) {
		t.Fatal("second range: wrong bytes")
	}
	if blob.calls.Load() != before {
		t.Errorf("a range already held went to the origin again (%d calls, then %d)", before, blob.calls.Load())
	}
	if !peer.HeldTask(p, digest) {
		t.Fatal("the task is not open while its fetcher is")
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	waitReleased(t, p, digest)
	if _, err := f.Fetch(context.Background(), 0, 10); !errors.Is(err, peer.ErrFetcherClosed) {
		t.Fatalf("Fetch after Close: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// A reader still open when the fetcher closes keeps the task until it is
// closed, so that storage GC never pulls bytes from under it.
func TestLazyFetcherCloseWaitsForReaders(t *testing.T) {
	p := standalonePeer(t)
	blob, digest := newMemBlob(t, 200<<10)
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Length: int64(len(blob.data))}, blob)
	rc, err := f.Fetch(context.Background(), 0, 100<<10)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	time.Sleep(50 * time.Millisecond)
	if !peer.HeldTask(p, digest) {
		t.Fatal("the task was released under an open reader")
	}
	got, err := io.ReadAll(rc)
	if err != nil || !bytes.Equal(got, blob.data[:100<<10]) {
		t.Fatalf("read after Close: %d bytes, %v", len(got), err)
	}
	rc.Close()
	rc.Close() // twice is harmless
	waitReleased(t, p, digest)
}

// Without a size the peer cannot open the task: reads go to the origin
// directly, and the layer keeps working.
func TestLazyFetcherFallsBackToDirect(t *testing.T) {
	p := standalonePeer(t)
	blob, digest := newMemBlob(t, 10<<10)
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest}, blob)
	defer f.Close()
	if got := readRange(t, f, 100, 50); !bytes.Equal(got, blob.data[100:150]) {
		t.Fatal("direct read: wrong bytes")
	}
	if peer.HeldTask(p, digest) {
		t.Fatal("a task was opened without a size")
	}
}

func TestLazyFetcherConcurrent(t *testing.T) {
	p := standalonePeer(t)
	blob, digest := newMemBlob(t, 1<<20)
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Length: int64(len(blob.data))}, blob)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := int64(i) * 30 << 10
			rc, err := f.Fetch(context.Background(), off, 4096)
			if err != nil {
				errs <- err
				return
			}
			b, err := io.ReadAll(rc)
			rc.Close()
			if err == nil && !bytes.Equal(b, blob.data[off:off+4096]) {
				err = fmt.Errorf("range at %d: wrong bytes", off)
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	f.Close()
	waitReleased(t, p, digest)
}

// blockingSource is an origin whose Size waits for release: the task's
// Open hangs in it.
type blockingSource struct {
	*memBlob
	release chan struct{}
}

func (s blockingSource) Size(ctx context.Context) (int64, error) {
	select {
	case <-s.release:
		return int64(len(s.data)), nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// A Fetch waiting for another's Open of the task gives up on the peer
// within its own context and reads the registry directly; the Open, once
// it ends, serves the rest.
func TestLazyFetcherWaitHonoursContext(t *testing.T) {
	p := standalonePeer(t)
	blob, digest := newMemBlob(t, 8<<10)
	src := blockingSource{memBlob: blob, release: make(chan struct{})}
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Source: src}, blob)
	defer f.Close()
	first := make(chan error, 1)
	go func() {
		rc, err := f.Fetch(context.Background(), 0, 10)
		if err == nil {
			rc.Close()
		}
		first <- err
	}()
	time.Sleep(50 * time.Millisecond) // the first Fetch is in Open
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if got := fetchCtx(t, ctx, f, 0, 10); !bytes.Equal(got, blob.data[:10]) {
		t.Fatal("waiting Fetch: wrong bytes")
	}
	// Half the 50ms goes to the peer path, then the registry answers
	// from memory: anything near 250ms waited past the deadline.
	if d := time.Since(start); d > 250*time.Millisecond {
		t.Fatalf("waiting Fetch took %v, past its deadline", d)
	}
	close(src.release)
	if err := <-first; err != nil {
		t.Fatalf("opening Fetch: %v", err)
	}
	if got := readRange(t, f, 100, 10); !bytes.Equal(got, blob.data[100:110]) {
		t.Fatal("wrong bytes after the Open")
	}
}

func TestRegistryBlobRequest(t *testing.T) {
	repo, _ := name.NewRepository("reg.example:5000/lib/app")
	h, _ := v1.NewHash("sha256:" + strings.Repeat("a", 64))
	r := peer.RegistryBlobRequest(repo, v1.Descriptor{Digest: h, Size: 42})
	if r.Digest != h.String() || r.Length != 42 ||
		r.URL != "https://reg.example:5000/v2/lib/app/blobs/"+h.String() {
		t.Fatalf("%+v", r)
	}
	// The proxy's and preheat's task for the same blob of the same
	// registry, whatever the repository; another registry's is another.
	other, _ := name.NewRepository("reg.example:5000/other")
	if o := peer.RegistryBlobRequest(other, v1.Descriptor{Digest: h}); o.TaskID != r.TaskID {
		t.Errorf("one registry's blob is two tasks: %s and %s", r.TaskID, o.TaskID)
	}
	elsewhere, _ := name.NewRepository("mirror.example/lib/app")
	if o := peer.RegistryBlobRequest(elsewhere, v1.Descriptor{Digest: h}); o.TaskID == r.TaskID {
		t.Error("two registries' blobs are one task")
	}
}

// After bytes through the peer failed the reader's verification, the
// reader asks for the range from the origin itself: FetchDirect reads
// direct, and the blob's next reads skip the peer for a while.
func TestLazyFetcherFetchDirectAfterCorruption(t *testing.T) {
	p := standalonePeer(t)
	blob, digest := newMemBlob(t, 300<<10)
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, URL: "http://reg.invalid/v2/x/blobs/" + digest, Digest: digest, Length: int64(len(blob.data))}, blob)
	defer f.Close()
	before := blob.calls.Load()
	rc, err := f.FetchDirect(context.Background(), 100, 50)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(rc)
	rc.Close()
	if !bytes.Equal(got, blob.data[100:150]) || blob.calls.Load() != before+1 {
		t.Fatalf("FetchDirect: %d bytes, %d direct calls", len(got), blob.calls.Load()-before)
	}
	// The breaker is open: the next read goes direct too, exactly its range.
	before = blob.calls.Load()
	if got := readRange(t, f, 200<<10, 10); !bytes.Equal(got, blob.data[200<<10:200<<10+10]) || blob.calls.Load() != before+1 {
		t.Fatalf("read after a corrupt range: %d direct calls", blob.calls.Load()-before)
	}
}
