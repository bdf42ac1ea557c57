package peer

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	pieceBytes   *prometheus.CounterVec
	badPieces    prometheus.Counter
	backToSource *prometheus.CounterVec
	schedulerUp  prometheus.Gauge
	uploadBytes  prometheus.Counter
	uploads      prometheus.Gauge
	completed    prometheus.Counter
}

func newMetrics(r prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		pieceBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "starling_peer_piece_bytes_total",
			Help: "Bytes of pieces downloaded, by source (parent or origin).",
		}, []string{"source"}),
		badPieces: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "starling_peer_bad_pieces_total",
			Help: "Pieces from parents that did not match their digest.",
		}),
		backToSource: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "starling_peer_back_to_source_total",
			Help: "Pieces fetched from the origin, by reason (scheduled, scheduler_unreachable, standalone, parents_failed).",
		}, []string{"reason"}),
		schedulerUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "starling_peer_scheduler_up",
			Help: "1 when the last announce reached every scheduler.",
		}),
		uploadBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "starling_peer_upload_bytes_total",
			Help: "Bytes of pieces served to other peers.",
		}),
		uploads: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "starling_peer_uploads",
			Help: "Uploads being served now.",
		}),
		completed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "starling_peer_tasks_completed_total",
			Help: "Tasks downloaded whole and verified.",
		}),
	}
	for _, c := range []prometheus.Collector{m.pieceBytes, m.badPieces, m.backToSource, m.schedulerUp, m.uploadBytes, m.uploads, m.completed} {
		if err := r.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
