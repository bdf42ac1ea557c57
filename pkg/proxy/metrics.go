package proxy

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	requests *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	refused  prometheus.Counter
	authz    *prometheus.CounterVec
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
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "starling_proxy_refused_total",
			Help: "Requests refused with 403: an upstream, or a CONNECT, outside the allowlist.",
		}),
		authz: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "starling_proxy_authz_checks_total",
			Help: "Checks of a client's access with the origin before cached bytes are served, by result: cached (a recent answer), allowed, public, refused, failed.",
		}, []string{"result"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.bytes, m.refused, m.authz} {
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
