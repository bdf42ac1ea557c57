package chunkcache

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// The metrics are process-wide: a daemon opens one cache per node, and tests
// that open several see the sum.
var (
	metricBytes = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "starling_chunk_cache_bytes",
		Help: "Bytes held by the chunk cache, including space reserved by writes in progress.",
	})
	metricEvictions = promauto.NewCounter(prometheus.CounterOpts{
		Name: "starling_chunk_cache_evictions_total",
		Help: "Chunks evicted from the chunk cache to keep its quota.",
	})
	metricHits = promauto.NewCounter(prometheus.CounterOpts{
		Name: "starling_chunk_cache_hits_total",
		Help: "Chunk reads served from the chunk cache.",
	})
	metricMisses = promauto.NewCounter(prometheus.CounterOpts{
		Name: "starling_chunk_cache_misses_total",
		Help: "Chunk reads that did not find their chunk in the chunk cache.",
	})
)
