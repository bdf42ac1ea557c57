package layer

import (
	"context"
	"io"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/starling-dev/starling/pkg/blob"
)

// fetchFunc is a blob.Fetcher made of a function.
type fetchFunc func(ctx context.Context, off, length int64) (io.ReadCloser, error)

func (f fetchFunc) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	return f(ctx, off, length)
}

var (
	descLayerBytes = prometheus.NewDesc("starling_layer_bytes_total",
		"Bytes of lazily mounted layers by where they came from: cache (reads the chunk store answered), local (this node's peer storage), peer, origin.",
		[]string{"source"}, nil)
	descLayerWait = prometheus.NewDesc("starling_layer_wait_seconds_total",
		"Time lazy layer fetches waited, by the source that answered.",
		[]string{"source"}, nil)
)

// sourceCollector reports the Manager's bytes and waits by source, summed
// over its open layers and those it closed: one series per source, the
// per-layer numbers are in Status.
type sourceCollector struct{ m *Manager }

func (c sourceCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descLayerBytes
	ch <- descLayerWait
}

func (c sourceCollector) Collect(ch chan<- prometheus.Metric) {
	tot := c.m.Sources()
	for _, s := range blob.Sources {
		ch <- prometheus.MustNewConstMetric(descLayerBytes, prometheus.CounterValue, float64(tot[s].Bytes), s)
		ch <- prometheus.MustNewConstMetric(descLayerWait, prometheus.CounterValue, tot[s].WaitSeconds, s)
	}
}

// Sources sums, over every layer this Manager resolved (open or closed),
// the bytes by source and the time fetches waited on each.
func (m *Manager) Sources() map[string]blob.SourceCount {
	m.mu.Lock()
	defer m.mu.Unlock()
	tot := make(map[string]blob.SourceCount, len(blob.Sources))
	for k, c := range m.retired {
		tot[k] = c
	}
	for l := range m.layers {
		for k, c := range l.chunks.Stats().Sources {
			t := tot[k]
			t.Bytes += c.Bytes
			t.WaitSeconds += c.WaitSeconds
			tot[k] = t
		}
	}
	return tot
}

// retire adds what a layer that is gone (closed, or failed to resolve)
// fetched to the Manager's totals.
func (m *Manager) retire(src map[string]blob.SourceCount) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.retireLocked(src)
}

func (m *Manager) retireLocked(src map[string]blob.SourceCount) {
	for k, c := range src {
		r := m.retired[k]
		r.Bytes += c.Bytes
		r.WaitSeconds += c.WaitSeconds
		m.retired[k] = r
	}
}
