package peer_test

import (
	"context"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/peer"
)

type testPeer struct {
	*peer.Peer
	reg *prometheus.Registry
}

func schedPeer(t *testing.T, sched string, seed bool) testPeer {
	reg := prometheus.NewRegistry()
	p := newPeer(t, peer.Options{Schedulers: []string{sched}, UploadListen: "127.0.0.1:0", PieceSize: 1 << 20,
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
