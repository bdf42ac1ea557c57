package peer_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/scheduler"
)

type testPeer struct {
	*peer.Peer
	reg *prometheus.Registry
}

func schedPeer(t *testing.T, sched string, seed bool) testPeer {
	return schedPeerSized(t, sched, seed, 1<<20)
}

func schedPeerSized(t *testing.T, sched string, seed bool, pieceSize int64) testPeer {
	reg := prometheus.NewRegistry()
	p := newPeer(t, peer.Options{Schedulers: []string{sched}, UploadListen: "127.0.0.1:0", PieceSize: pieceSize,
		Seed: seed, Registerer: reg, AnnounceInterval: 200 * time.Millisecond})
	return testPeer{p, reg}
}

func fetchAll(t *testing.T, p *peer.Peer, digest, u string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d, err := p.Open(ctx, peer.Request{TaskID: digest, URL: u, Digest: digest})
	if err != nil {
		t.Error(err)
		return ""
	}
	defer d.Close()
	b, err := io.ReadAll(d.NewReader(ctx, 0, -1))
	if err != nil {
		t.Error(err)
		return ""
	}
	if err := d.Wait(ctx); err != nil {
		t.Error(err)
	}
	return sum(b)
}

// Many peers that start one blob at once take each piece from the origin once.
func TestPeersShareOneOriginFetch(t *testing.T) {
	reg := testenv.StartRegistry(t)
	cp := testenv.StartCountingProxy(t, reg.Addr)
	data, digest, u := pushBlob(t, reg.Addr, cp.Addr, 24<<20+7)
	sched, _ := testenv.StartScheduler(t)
	var peers []testPeer
	for range 6 {
		peers = append(peers, schedPeer(t, sched, false))
	}
	time.Sleep(500 * time.Millisecond) // every peer announced
	var wg sync.WaitGroup
	for _, p := range peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			if got := fetchAll(t, p.Peer, digest, u); got != digest {
				t.Errorf("peer %s: digest %s", p.ID(), got)
			}
			t.Logf("peer %s done in %v", p.ID(), time.Since(t0))
		}()
	}
	wg.Wait()
	var fromParents float64
	for _, p := range peers {
		fromParents += testenv.Counter(t, p.reg, "starling_peer_piece_bytes_total", "source", "parent")
	}
	origin := cp.BlobBytes(digest)
	t.Logf("origin served %d bytes for a %d-byte blob (%.3fx); peers took %.0f bytes from each other", origin, len(data), float64(origin)/float64(len(data)), fromParents)
	if float64(origin) > 1.05*float64(len(data)) {
		t.Fatalf("origin served %.2fx the blob", float64(origin)/float64(len(data)))
	}
}

// A seed fetches from the origin; the other peers wait for it.
func TestSeedFetchesForOthers(t *testing.T) {
	reg := testenv.StartRegistry(t)
	cp := testenv.StartCountingProxy(t, reg.Addr)
	data, digest, u := pushBlob(t, reg.Addr, cp.Addr, 8<<20)
	sched, _ := testenv.StartScheduler(t)
	seed := schedPeer(t, sched, true)
	a := schedPeer(t, sched, false)
	time.Sleep(500 * time.Millisecond)
	if got := fetchAll(t, a.Peer, digest, u); got != digest {
		t.Fatalf("digest %s", got)
	}
	if o := testenv.Counter(t, a.reg, "starling_peer_piece_bytes_total", "source", "origin"); o != 0 {
		t.Errorf("the peer fetched %.0f bytes from the origin with a seed present", o)
	}
	if o := testenv.Counter(t, seed.reg, "starling_peer_piece_bytes_total", "source", "origin"); o != float64(len(data)) {
		t.Errorf("the seed fetched %.0f bytes from the origin, want %d", o, len(data))
	}
}

// A parent that serves corrupted pieces is caught and refused; the
// download still finishes right.
func TestCorruptParentRefused(t *testing.T) {
	reg := testenv.StartRegistry(t)
	_, digest, u := pushBlob(t, reg.Addr, reg.Addr, 6<<20)
	sched, _ := testenv.StartScheduler(t)
	os.Setenv("STARLING_TEST_CORRUPT_UPLOADS", "1")
	bad := schedPeer(t, sched, false)
	os.Unsetenv("STARLING_TEST_CORRUPT_UPLOADS")
	time.Sleep(300 * time.Millisecond)
	if got := fetchAll(t, bad.Peer, digest, u); got != digest {
		t.Fatalf("digest %s", got)
	}
	good := schedPeer(t, sched, false)
	time.Sleep(300 * time.Millisecond)
	if got := fetchAll(t, good.Peer, digest, u); got != digest {
		t.Fatalf("digest %s after a corrupt parent", got)
	}
	if n := testenv.Counter(t, good.reg, "starling_peer_bad_pieces_total", "", ""); n < 1 {
		t.Fatal("no bad piece was detected")
	}
	// Pieces already on their way when the first bad one is caught come
	// back bad too; none is asked of that parent twice.
	if n := testenv.Counter(t, good.reg, "starling_peer_bad_pieces_total", "", ""); n > 6 {
		t.Errorf("%v bad pieces for a 6-piece blob: the corrupt parent was asked again", n)
	}
}

// With the scheduler gone, peers fetch from the origin.
func TestSchedulerDown(t *testing.T) {
	reg := testenv.StartRegistry(t)
	_, digest, u := pushBlob(t, reg.Addr, reg.Addr, 3<<20)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := l.Addr().String()
	l.Close()
	p := schedPeer(t, dead, false)
	if got := fetchAll(t, p.Peer, digest, u); got != digest {
		t.Fatalf("digest %s", got)
	}
	if n := testenv.Counter(t, p.reg, "starling_peer_back_to_source_total", "reason", "scheduler_unreachable"); n < 1 {
		t.Fatal("no back-to-source for an unreachable scheduler")
	}
}

// testOrigin serves one blob with ranges, slowly, counting the bytes it
// sends and the most requests it served at once.
type testOrigin struct {
	data        []byte
	digest      string
	url         string
	delay       time.Duration
	sent        atomic.Int64
	cur, peak   atomic.Int64
	gets, heads atomic.Int64
}

func startOrigin(t *testing.T, size int, delay time.Duration) *testOrigin {
	t.Helper()
	o := &testOrigin{data: make([]byte, size), delay: delay}
	rand.Read(o.data)
	o.digest = sum(o.data)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodHead {
			o.heads.Add(1)
		} else {
			o.gets.Add(1)
		}
		n := o.cur.Add(1)
		defer o.cur.Add(-1)
		for p := o.peak.Load(); n > p && !o.peak.CompareAndSwap(p, n); p = o.peak.Load() {
		}
		time.Sleep(o.delay)
		http.ServeContent(countingWriter{w, &o.sent}, r, "", time.Time{}, bytes.NewReader(o.data))
	}))
	t.Cleanup(srv.Close)
	o.url = srv.URL + "/blob"
	return o
}

func (o *testOrigin) ratio() float64 { return float64(o.sent.Load()) / float64(len(o.data)) }

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (w countingWriter) Write(b []byte) (int, error) {
	k, err := w.ResponseWriter.Write(b)
	w.n.Add(int64(k))
	return k, err
}

// restartableScheduler is a scheduler on a fixed address that a test can
// stop and start again with empty state, as a restarted process would be.
type restartableScheduler struct {
	t    *testing.T
	addr string
	g    *grpc.Server
}

func startRestartableScheduler(t *testing.T) *restartableScheduler {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rs := &restartableScheduler{t: t, addr: l.Addr().String()}
	rs.serve(l)
	t.Cleanup(func() { rs.g.Stop() })
	return rs
}

func (rs *restartableScheduler) serve(l net.Listener) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := scheduler.NewServer(scheduler.New(scheduler.Options{}), scheduler.ServerOptions{Logger: quiet})
	if err != nil {
		rs.t.Fatal(err)
	}
	g := grpc.NewServer()
	srv.RegisterGRPC(g)
	go func() { _ = g.Serve(l) }()
	rs.g = g
}

func (rs *restartableScheduler) restart(down time.Duration) {
	rs.g.Stop()
	time.Sleep(down)
	var l net.Listener
	var err error
	for range 50 {
		if l, err = net.Listen("tcp", rs.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		rs.t.Fatal(err)
	}
	rs.serve(l)
}

type readProgress struct{ n atomic.Int64 }

func (p *readProgress) Write(b []byte) (int, error) { p.n.Add(int64(len(b))); return len(b), nil }

// streamAll reads a whole task through NewReader, as `starling get` does.
func streamAll(t *testing.T, p *peer.Peer, o *testOrigin, prog *readProgress) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d, err := p.Open(ctx, peer.Request{TaskID: o.digest, URL: o.url, Digest: o.digest})
	if err != nil {
		t.Error(err)
		return
	}
	defer d.Close()
	rc := d.NewReader(ctx, 0, -1)
	defer rc.Close()
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(h, prog), rc); err != nil {
		t.Error(err)
		return
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != o.digest {
		t.Errorf("peer %s: digest %s, want %s", p.ID(), got, o.digest)
	}
}

// Peers that start one blob at once without a seed: only a few of them
// fetch from the origin at once, and the origin sends the blob once.
func TestOriginFetchersBounded(t *testing.T) {
	o := startOrigin(t, 32<<18, 20*time.Millisecond) // 32 pieces
	sched, _ := testenv.StartScheduler(t)
	var peers []testPeer
	for range 6 {
		peers = append(peers, schedPeerSized(t, sched, false, 256<<10))
	}
	time.Sleep(500 * time.Millisecond)
	var wg sync.WaitGroup
	for _, p := range peers {
		wg.Add(1)
		go func() { defer wg.Done(); streamAll(t, p.Peer, o, new(readProgress)) }()
	}
	wg.Wait()
	t.Logf("origin sent %.3fx the blob; at most %d requests at once", o.ratio(), o.peak.Load())
	// Two fetchers with 8 pieces in flight each, and the size request of
	// every peer that raced to open the task.
	if peak := o.peak.Load(); peak > 2*8+int64(len(peers)) {
		t.Errorf("%d origin requests at once, want at most %d", peak, 2*8+len(peers))
	}
	if r := o.ratio(); r > 1.05 {
		t.Errorf("origin sent %.3fx the blob", r)
	}
}

// A scheduler restarted mid-transfer: the peers wait for it a moment
// instead of fetching from the origin, and once it is back they re-announce
// what they hold before anyone is sent to the origin for it again.
func TestNoOriginRefetchAfterSchedulerRestart(t *testing.T) {
	o := startOrigin(t, 48<<18, 150*time.Millisecond) // 48 pieces, ~1 s for a seed alone
	rs := startRestartableScheduler(t)
	seed := schedPeerSized(t, rs.addr, true, 256<<10)
	var peers []testPeer
	for range 3 {
		peers = append(peers, schedPeerSized(t, rs.addr, false, 256<<10))
	}
	time.Sleep(500 * time.Millisecond)
	progs := make([]*readProgress, len(peers))
	var wg sync.WaitGroup
	for i, p := range peers {
		progs[i] = new(readProgress)
		wg.Add(1)
		go func() { defer wg.Done(); streamAll(t, p.Peer, o, progs[i]) }()
	}
	deadline := time.Now().Add(time.Minute)
	for o.sent.Load() < int64(len(o.data))/3 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	before := o.sent.Load()
	rs.restart(300 * time.Millisecond)
	t.Logf("scheduler restarted with %d of %d bytes read by the first peer, origin had sent %d", progs[0].n.Load(), len(o.data), before)
	wg.Wait()
	fromOrigin := testenv.Counter(t, seed.reg, "starling_peer_piece_bytes_total", "source", "origin")
	for _, p := range peers {
		fromOrigin += testenv.Counter(t, p.reg, "starling_peer_piece_bytes_total", "source", "origin")
	}
	for _, p := range append([]testPeer{seed}, peers...) {
		var reasons []string
		for _, r := range []string{"scheduled", "scheduler_unreachable", "parents_failed", "standalone"} {
			if n := testenv.Counter(t, p.reg, "starling_peer_back_to_source_total", "reason", r); n > 0 {
				reasons = append(reasons, fmt.Sprintf("%s=%.0f", r, n))
			}
		}
		t.Logf("peer %s (seed %v): origin pieces %v", p.ID(), p == seed, reasons)
	}
	t.Logf("origin sent %.3fx the blob (%.0f piece bytes)", o.ratio(), fromOrigin)
	if fromOrigin > 1.10*float64(len(o.data)) {
		t.Errorf("peers took %.3fx the blob from the origin across a scheduler restart, want at most 1.10x", fromOrigin/float64(len(o.data)))
	}
}
