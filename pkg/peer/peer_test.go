package peer_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/registry"
)

// pushBlob puts random bytes into a real registry and returns them, their
// digest and the blob's URL (through the counting proxy when one is given).
func pushBlob(t *testing.T, regAddr, urlHost string, size int) ([]byte, string, string) {
	t.Helper()
	data := make([]byte, size)
	rand.Read(data)
	l := static.NewLayer(data, types.OCIUncompressedLayer)
	c := registry.New(registry.DefaultConfig())
	repo, err := c.ParseRepository(regAddr + "/p2p/blob")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WriteLayer(context.Background(), repo, l); err != nil {
		t.Fatal(err)
	}
	d, _ := l.Digest()
	return data, d.String(), "http://" + urlHost + "/v2/p2p/blob/blobs/" + d.String()
}

func newPeer(t *testing.T, o peer.Options) *peer.Peer {
	t.Helper()
	if o.Root == "" {
		o.Root = t.TempDir()
	}
	p, err := peer.New(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func sum(b []byte) string { s := sha256.Sum256(b); return "sha256:" + hex.EncodeToString(s[:]) }

func TestStandaloneDownloadAndRestart(t *testing.T) {
	reg := testenv.StartRegistry(t)
	cp := testenv.StartCountingProxy(t, reg.Addr)
	data, digest, u := pushBlob(t, reg.Addr, cp.Addr, 9<<20+123)
	root := t.TempDir()
	p, err := peer.New(peer.Options{Root: root, PieceSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	d, err := p.Open(ctx, peer.Request{TaskID: digest, URL: u, Digest: digest})
	if err != nil {
		t.Fatal(err)
	}
	// A range first: only its pieces leave the origin.
	buf := make([]byte, 100)
	if _, err := d.ReadAt(buf, 5<<20+10); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, data[5<<20+10:5<<20+110]) {
		t.Fatal("range read: wrong bytes")
	}
	if got := cp.BlobBytes(digest); got != 1<<20 {
		t.Fatalf("a 100-byte read fetched %d bytes from the origin, want one piece", got)
	}
	got, err := io.ReadAll(d.NewReader(ctx, 0, -1))
	if err != nil {
		t.Fatal(err)
	}
	if sum(got) != digest {
		t.Fatal("whole read: wrong digest")
	}
	if err := d.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	d.Close()
	p.Close()
	if got := cp.BlobBytes(digest); got != int64(len(data)) {
		t.Fatalf("origin served %d bytes for a %d-byte blob", got, len(data))
	}

	// A restarted peer serves what it had without the origin.
	p2 := newPeer(t, peer.Options{Root: root, PieceSize: 1 << 20})
	d2, err := p2.Open(ctx, peer.Request{TaskID: digest, URL: u, Digest: digest})
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	got, err = io.ReadAll(d2.NewReader(ctx, 0, -1))
	if err != nil || sum(got) != digest {
		t.Fatalf("after restart: %v", err)
	}
	if cp.BlobBytes(digest) != int64(len(data)) {
		t.Fatal("a restarted peer went to the origin for a task it held")
	}
}

func TestOriginErrors(t *testing.T) {
	reg := testenv.StartRegistry(t)
	p := newPeer(t, peer.Options{})
	missing := "sha256:" + hex.EncodeToString(make([]byte, 32))
	_, err := p.Open(context.Background(), peer.Request{TaskID: missing, URL: "http://" + reg.Addr + "/v2/p2p/blob/blobs/" + missing, Digest: missing})
	var oe *peer.OriginError
	if !errors.As(err, &oe) || oe.StatusCode != http.StatusNotFound {
		t.Fatalf("missing blob: %v, want an origin 404", err)
	}
	_, err = p.Open(context.Background(), peer.Request{TaskID: missing, URL: "http://127.0.0.1:1/v2/x/blobs/" + missing})
	if err == nil {
		t.Fatal("unreachable origin: no error")
	}
}

func TestWrongDigestDiscards(t *testing.T) {
	reg := testenv.StartRegistry(t)
	_, _, u := pushBlob(t, reg.Addr, reg.Addr, 3<<20)
	p := newPeer(t, peer.Options{PieceSize: 1 << 20})
	wrong := "sha256:" + hex.EncodeToString(make([]byte, 32))
	d, err := p.Open(context.Background(), peer.Request{TaskID: "0123abcd", URL: u, Digest: wrong})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	d.Start()
	if err := d.Wait(context.Background()); err == nil {
		t.Fatal("a blob that does not match its digest was accepted")
	}
}

// A peer stopped mid-download finishes it after a restart, without
// fetching again what it had.
func TestRestartResumesDownload(t *testing.T) {
	reg := testenv.StartRegistry(t)
	cp := testenv.StartCountingProxy(t, reg.Addr)
	data, digest, u := pushBlob(t, reg.Addr, cp.Addr, 16<<20)
	root := t.TempDir()
	p, err := peer.New(peer.Options{Root: root, PieceSize: 1 << 20, Concurrency: 2})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	d, err := p.Open(context.Background(), peer.Request{TaskID: digest, URL: u, Digest: digest})
	if err != nil {
		t.Fatal(err)
	}
	d.Start()
	testenv.WaitFor(t, 30*time.Second, "a few pieces", func() bool { done, _ := d.Progress(); return done >= 3<<20 })
	cp.Stall()
	held, _ := d.Progress()
	d.Close()
	p.Close()
	cp.Resume()
	if held >= int64(len(data)) {
		t.Fatal("the download finished before the peer stopped")
	}

	p2 := newPeer(t, peer.Options{Root: root, PieceSize: 1 << 20})
	d2, err := p2.Open(context.Background(), peer.Request{TaskID: digest, URL: u, Digest: digest})
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := d2.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(d2.NewReader(ctx, 0, -1))
	if err != nil || sum(got) != digest {
		t.Fatalf("after the restart: %v", err)
	}
	// What the stalled requests had in flight may come twice, nothing else.
	if o := cp.BlobBytes(digest); o > int64(len(data))+2<<20 {
		t.Fatalf("origin served %d bytes for a %d-byte blob held %d bytes before the restart", o, len(data), held)
	}
}

// orderSource is an origin that records which pieces are asked, in order.
type orderSource struct {
	data  []byte
	psize int64
	mu    sync.Mutex
	order []int
}

func (s *orderSource) Size(context.Context) (int64, error) { return int64(len(s.data)), nil }

func (s *orderSource) Fetch(_ context.Context, off, length int64) (io.ReadCloser, error) {
	s.mu.Lock()
	s.order = append(s.order, int(off/s.psize))
	s.mu.Unlock()
	time.Sleep(time.Millisecond)
	return io.NopCloser(bytes.NewReader(s.data[off : off+length])), nil
}

func (s *orderSource) asked() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.order...)
}

// farthest reports how far ahead of its rank in order a piece was asked
// for: 0 for strictly in order, about the task's length for a shuffle.
func farthest(order []int) int {
	d := 0
	for i, n := range order {
		d = max(d, n-i)
	}
	return d
}

// A streaming reader (starling get, a whole-blob GET through the proxy)
// gets the head of the blob first: pieces are fetched from a window just
// ahead of it, so it writes as the blob arrives. Without a reader a peer
// spreads its order; a seed goes in order.
func TestOrderFollowsTheReader(t *testing.T) {
	const psize, count, conc = 64 << 10, 64, 2
	data := make([]byte, psize*count)
	rand.Read(data)
	digest := sum(data)
	open := func(seed bool) (*peer.Download, *orderSource) {
		p := newPeer(t, peer.Options{PieceSize: psize, Concurrency: conc, Seed: seed})
		src := &orderSource{data: data, psize: psize}
		d, err := p.Open(context.Background(), peer.Request{TaskID: digest, Digest: digest, Source: src})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d, src
	}
	ctx := context.Background()

	d, src := open(false)
	rc := d.NewReader(ctx, 0, -1)
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || sum(got) != digest {
		t.Fatalf("reader: %d bytes, %v", len(got), err)
	}
	// The window is 2*Concurrency pieces past the reader's front.
	if f := farthest(src.asked()); f > 2*conc+conc {
		t.Errorf("with a reader, a piece was asked %d places early: %v", f, src.asked())
	}

	d, src = open(false)
	d.Start()
	if err := d.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if f := farthest(src.asked()); f < count/4 {
		t.Errorf("without a reader the order is not spread (at most %d places early): %v", f, src.asked())
	}

	d, src = open(true)
	d.Start()
	if err := d.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if f := farthest(src.asked()); f > conc {
		t.Errorf("a seed asked a piece %d places early: %v", f, src.asked())
	}
}
