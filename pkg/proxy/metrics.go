package proxy

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	requests *prometheus.CounterVec
	bytes    *prometheus.CounterVec
}

func newMetrics(r prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "starling_proxy_requests_total",
			Help: "Requests to the proxy and mirror, by path: p2p (through the peer) or direct (straight to the upstream).",
		}, []string{"path"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "starling_proxy_bytes_total",
			Help: "Response body bytes sent to clients, by path: p2p or direct.",
		}, []string{"path"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.bytes} {
		if err := r.Register(c); err != nil {
			return nil, err
		}
	}
	// Both paths show from the start, so a rate() has a series to work on.
	for _, p := range []string{"p2p", "direct"} {
		m.requests.WithLabelValues(p)
		m.bytes.WithLabelValues(p)
	}
	return m, nil
}
