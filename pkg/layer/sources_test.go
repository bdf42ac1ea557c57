package layer_test

import (
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/pkg/blob"
	"github.com/starling-dev/starling/pkg/chunkcache"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/layer"
	"github.com/starling-dev/starling/pkg/originq"
)

// sourcedBlob is a fetcher that says where its bytes came from, as the
// peer's lazy fetcher does.
type sourcedBlob struct{ *memBlob }

func (sourcedBlob) BytesBySource() map[string]int64 {
	return map[string]int64{"local": 5, "peer": 700, "origin": 30}
}

func (sourcedBlob) WaitBySource() map[string]time.Duration {
	return map[string]time.Duration{"peer": 2 * time.Second, "origin": time.Second}
}

// prioBlob records the origin priority of each request.
type prioBlob struct {
	*memBlob
	mu   sync.Mutex
	seen map[originq.Priority]int
}

func (p *prioBlob) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	p.mu.Lock()
	p.seen[originq.PriorityFrom(ctx)]++
	p.mu.Unlock()
	return p.memBlob.Fetch(ctx, off, length)
}

// gathered returns the value of metric{source=src} in reg.
func gathered(t *testing.T, reg *prometheus.Registry, metric, src string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != metric {
			continue
		}
		for _, m := range mf.GetMetric() {
			if labelOf(m, "source") == src {
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("no %s{source=%q}", metric, src)
	return 0
}

func labelOf(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// Each layer's status says where its bytes came from: a fetcher with
// SourceStats is believed, a plain one is the origin, counted by the
// layer; the metrics sum every layer, closed ones included.
func TestSourcesByLayer(t *testing.T) {
	plainData, plainDesc := esgzLayer(t, 4096, file{"a", testimage.Random(1, 50000)}, file{"b", testimage.Random(2, 30000)})
	srcData, srcDesc := esgzLayer(t, 4096, file{"c", testimage.Random(3, 20000)})
	plain := &memBlob{data: plainData}
	tagged := &prioBlob{memBlob: plain, seen: map[originq.Priority]int{}}
	sourced := sourcedBlob{&memBlob{data: srcData}}
	store, err := chunkcache.Open(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	fs := config.DefaultFS()
	fs.Prefetch, fs.BackgroundFetch, fs.BackgroundFetchDelay = false, true, time.Millisecond
	reg := prometheus.NewRegistry()
	m := manager(t, layer.Options{
		Root: t.TempDir(), FS: fs, Store: store, Registerer: reg,
		Fetcher: func(_ name.Repository, d v1.Descriptor) blob.Fetcher {
			if d.Digest == srcDesc.Digest {
				return sourced
			}
			return tagged
		},
	})
	ctx := context.Background()
	lp, err := m.Resolve(ctx, repo, plainDesc)
	if err != nil {
		t.Fatal(err)
	}
	ls, err := m.Resolve(ctx, repo, srcDesc)
	if err != nil {
		t.Fatal(err)
	}
	// Background fetch brings every chunk of both layers.
	deadline := time.Now().Add(10 * time.Second)
	local := func(l *layer.Layer) bool {
		for _, c := range l.Index().Chunks() {
			if !store.Has(c.Digest) {
				return false
			}
		}
		return true
	}
	for _, l := range []*layer.Layer{lp, ls} {
		for !local(l) {
			if time.Now().After(deadline) {
				t.Fatalf("background fetch: %d of %d chunks", l.Stats().ChunksFetched, len(l.Index().Chunks()))
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	requested := func() int64 {
		var n int64
		plain.mu.Lock()
		defer plain.mu.Unlock()
		for _, r := range plain.ranges {
			n += r[1] - r[0]
		}
		return n
	}
	// A request may still be between its last byte and its return.
	for lp.Stats().Sources[blob.SourceOrigin].Bytes != requested() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	st := lp.Stats().Sources
	if st[blob.SourceOrigin].Bytes != requested() || st[blob.SourceOrigin].WaitSeconds <= 0 {
		t.Errorf("plain fetcher: origin %+v, want %d bytes (footer, TOC and chunks) and some wait", st[blob.SourceOrigin], requested())
	}
	if st[blob.SourcePeer].Bytes != 0 || st[blob.SourceLocal].Bytes != 0 {
		t.Errorf("plain fetcher: %+v", st)
	}
	st = ls.Stats().Sources
	if st[blob.SourcePeer] != (blob.SourceCount{Bytes: 700, WaitSeconds: 2}) || st[blob.SourceLocal].Bytes != 5 ||
		st[blob.SourceOrigin] != (blob.SourceCount{Bytes: 30, WaitSeconds: 1}) {
		t.Errorf("fetcher with sources: %+v", st)
	}

	// The footer and TOC at resolve are demand, the rest background fetch.
	tagged.mu.Lock()
	if tagged.seen[originq.Demand] != 1 || tagged.seen[originq.Background] == 0 || len(tagged.seen) != 2 {
		t.Errorf("requests by priority %v, want the TOC at demand and the rest background", tagged.seen)
	}
	tagged.mu.Unlock()

	status := m.Status()
	if len(status.Layers) != 2 {
		t.Fatalf("status has %d layers", len(status.Layers))
	}
	for _, s := range status.Layers {
		if len(s.Stats.Sources) != 4 {
			t.Errorf("status of %s: sources %v", s.Digest, s.Stats.Sources)
		}
	}

	wantOrigin := float64(requested() + 30)
	if got := gathered(t, reg, "starling_layer_bytes_total", "origin"); got != wantOrigin {
		t.Errorf("starling_layer_bytes_total{origin} %v, want %v", got, wantOrigin)
	}
	if got := gathered(t, reg, "starling_layer_bytes_total", "peer"); got != 700 {
		t.Errorf("starling_layer_bytes_total{peer} %v", got)
	}
	if got := gathered(t, reg, "starling_layer_wait_seconds_total", "peer"); got != 2 {
		t.Errorf("starling_layer_wait_seconds_total{peer} %v", got)
	}
	// A closed layer's bytes stay in the totals.
	ls.Close()
	if got := gathered(t, reg, "starling_layer_bytes_total", "peer"); got != 700 {
		t.Errorf("after close, starling_layer_bytes_total{peer} %v", got)
	}
	if got := gathered(t, reg, "starling_layer_bytes_total", "origin"); got != wantOrigin {
		t.Errorf("after close, starling_layer_bytes_total{origin} %v, want %v", got, wantOrigin)
	}
}
