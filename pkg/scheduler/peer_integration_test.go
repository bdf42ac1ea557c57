package scheduler_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/registry"
)

// TestPeersThroughScheduler runs real peers (a seed and plain ones) against
// a real scheduler server and registry: every peer gets the right bytes and
// the blob leaves the origin about once.
func TestPeersThroughScheduler(t *testing.T) {
	reg := testenv.StartRegistry(t)
	cp := testenv.StartCountingProxy(t, reg.Addr)

	const size = 24<<20 + 4321
	data := make([]byte, size)
	rand.Read(data)
	layer := static.NewLayer(data, types.OCIUncompressedLayer)
	rc := registry.New(registry.DefaultConfig())
	repo, err := rc.ParseRepository(reg.Addr + "/p2p/blob")
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.WriteLayer(context.Background(), repo, layer); err != nil {
		t.Fatal(err)
	}
	d, _ := layer.Digest()
	digest := d.String()
	url := "http://" + cp.Addr + "/v2/p2p/blob/blobs/" + digest

	addr, srv := testenv.StartScheduler(t)

	var regs []*prometheus.Registry // the seed's first
	var logBuf syncBuffer
	peerLog := slog.New(slog.NewTextHandler(&logBuf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("peer logs:\n%s", logBuf.String())
		}
	})
	start := func(seed bool) *peer.Peer {
		pr := prometheus.NewRegistry()
		regs = append(regs, pr)
		p, err := peer.New(peer.Options{Root: t.TempDir(), Seed: seed, Schedulers: []string{addr},
			AdvertiseIP: "127.0.0.1", UploadListen: "127.0.0.1:0", PieceSize: 1 << 20,
			AnnounceInterval: 100 * time.Millisecond, Logger: peerLog.With("peer", len(regs)-1), Registerer: pr})
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		return p
	}
	start(true)
	var peers []*peer.Peer
	for range 6 {
		peers = append(peers, start(false))
	}
	testenv.WaitFor(t, 10*time.Second, "peers announced", func() bool {
		n, seeds, _ := srv.Scheduler().Stats()
		return n == 7 && seeds == 1
	})

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, len(peers))
	for _, p := range peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dl, err := p.Open(ctx, peer.Request{TaskID: digest, URL: url, Digest: digest})
			if err != nil {
				errs <- err
				return
			}
			defer dl.Close()
			h := sha256.New()
			if _, err := io.Copy(h, dl.NewReader(ctx, 0, -1)); err != nil {
				errs <- err
				return
			}
			if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
				t.Errorf("a peer read %s, want %s", got, digest)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for i, r := range regs {
		for _, kv := range [][2]string{{"starling_peer_back_to_source_total", "reason"}, {"starling_peer_piece_bytes_total", "source"}} {
			t.Logf("peer %d (seed: %v) %s: %v", i, i == 0, kv[0], sampled(t, r, kv[0], kv[1]))
		}
	}
	if got := cp.BlobBytes(digest); float64(got) > 1.05*size {
		t.Fatalf("the origin served %d bytes of a %d-byte blob (%.2fx)", got, size, float64(got)/size)
	} else {
		t.Logf("the origin served %.3fx the blob", float64(got)/size)
	}
	// The plain peers waited for the seed, which fetched every piece from the origin.
	if seedOrigin := sampled(t, regs[0], "starling_peer_piece_bytes_total", "source")["origin"]; seedOrigin != size {
		t.Errorf("the seed fetched %v bytes from the origin, want all %d", seedOrigin, size)
	}
	testenv.WaitFor(t, 10*time.Second, "the seed holds the whole blob", func() bool {
		st, _ := srv.Scheduler().TaskStatus(digest)
		return st.SeedsComplete == 1 && st.Complete == 7
	})
}

// sampled returns a counter's values by the value of one label.
func sampled(t *testing.T, r *prometheus.Registry, name, label string) map[string]float64 {
	t.Helper()
	mfs, err := r.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == label {
					out[lp.GetValue()] += m.GetCounter().GetValue()
				}
			}
		}
	}
	return out
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
