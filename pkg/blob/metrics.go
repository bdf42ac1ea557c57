package blob

import "github.com/prometheus/client_golang/prometheus"

var (
	metricVerifyFailures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "starling_chunk_verify_failures_total",
		Help: "Chunks whose bytes did not match their digest.",
	})
)

func init() { prometheus.MustRegister(metricVerifyFailures) }
