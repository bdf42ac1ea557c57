package peer

import (
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/prometheus/client_golang/prometheus"
)

// Reasons a lazy read left the peer path for the registry. A parent that
// dies or hangs does not show as its own reason: the task asks the next
// parent or the origin itself (after avoidFor, maxParentRounds,
// PieceTimeout), so to a reader it is the range arriving late ("slow").
const (
	reasonScheduler = "scheduler" // the scheduler does not answer (peer-wide)
	reasonOpen      = "open"      // the task could not be opened
	reasonAuth      = "auth"      // 401/403 from the origin behind the peer, or no credentials
	reasonSlow      = "slow"      // the range was not there within LazyFallbackAfter
	reasonFailed    = "failed"    // a piece or the task failed (origin error, verification)
)

// breaker is the circuit breaker on the peer path of lazy reads. Closed:
// reads go through the peer. Open: they go to the registry directly
// until the period is over; then one read (the probe) tries the peer
// again while the others stay direct, and its outcome closes or reopens
// the breaker.
type breaker struct {
	mu      sync.Mutex
	open    bool
	until   time.Time
	probing bool
	reason  string
	retired bool // its fetcher closed: never opens again
}

// allow says whether a read may take the peer path; probe marks the one
// read whose outcome decides an open breaker.
func (b *breaker) allow(now time.Time) (ok, probe bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case !b.open:
		return true, false
	case b.probing || now.Before(b.until):
		return false, false
	default:
		b.probing = true
		return true, true
	}
}

// trip opens the breaker for period; opened reports a new event (it was
// closed, or its probe failed), which the caller logs and counts once.
// Reads that were already in flight when it opened fail into an open
// breaker without a second event.
func (b *breaker) trip(now time.Time, period time.Duration, reason string, probe bool) (opened, wasClosed bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.retired || (b.open && !probe) {
		return false, false
	}
	wasClosed = !b.open
	b.open, b.until, b.probing, b.reason = true, now.Add(period), false, reason
	return true, wasClosed
}

// succeed closes the breaker after a successful probe; closed reports
// the change. Only the probe closes it: a read of bytes already held
// locally says nothing about the party that failed.
func (b *breaker) succeed(probe bool) (closed bool) {
	if !probe {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.open {
		return false
	}
	b.open, b.probing = false, false
	return true
}

// abandon lets the next read probe when this probe ended without a
// verdict (its caller gave up).
func (b *breaker) abandon(probe bool) {
	if !probe {
		return
	}
	b.mu.Lock()
	b.probing = false
	b.mu.Unlock()
}

// retire ends the breaker with its fetcher; wasOpen says it was counted
// open.
func (b *breaker) retire() (wasOpen bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	wasOpen = b.open
	b.open, b.retired = false, true
	return wasOpen
}

func (b *breaker) state() (open bool, reason string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.open, b.reason
}

// lazyShared is the peer-wide side of lazy reads: their metrics and the
// breaker on the scheduler. The scheduler is one party for every blob, so
// its failure opens one breaker for the whole peer, not one per blob and
// read; the announce loop keeps probing it every AnnounceInterval, so no
// read has to be the probe: the breaker closes once the period is over
// and the scheduler answers again.
type lazyShared struct {
	fallbacks   *prometheus.CounterVec
	directReads *prometheus.CounterVec
	open        prometheus.Gauge
	bytes       *prometheus.CounterVec
	wait        *prometheus.CounterVec

	sched breaker
}

func newLazyShared(r prometheus.Registerer) (*lazyShared, error) {
	l := &lazyShared{
		fallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "starling_peer_lazy_fallback_total",
			Help: "Times the peer path of lazy reads failed and a breaker opened (reads then go to the registry directly), by reason (scheduler, open, auth, slow, failed).",
		}, []string{"reason"}),
		directReads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "starling_peer_lazy_direct_reads_total",
			Help: "Lazy reads sent to the registry directly instead of through the peer, by the reason of the breaker.",
		}, []string{"reason"}),
		open: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "starling_peer_lazy_breakers_open",
			Help: "Breakers open on the peer path of lazy reads (one per blob, one for the scheduler).",
		}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "starling_peer_lazy_bytes_total",
			Help: "Bytes lazy reads got, by source (local: this node's peer storage, peer, origin).",
		}, []string{"source"}),
		wait: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "starling_peer_lazy_wait_seconds_total",
			Help: "Time lazy reads waited for their bytes, by the source that answered.",
		}, []string{"source"}),
	}
	for _, c := range []prometheus.Collector{l.fallbacks, l.directReads, l.open, l.bytes, l.wait} {
		if err := r.Register(c); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// schedulerDown reports whether the peer has schedulers and the last call
// to them failed.
func (p *Peer) schedulerDown() bool {
	if p.sched == nil {
		return false
	}
	p.sched.mu.Lock()
	defer p.sched.mu.Unlock()
	return !p.sched.up
}

// schedulerOpen reports whether lazy reads skip the peer because of the
// scheduler, closing the breaker once its period is over and the
// scheduler answers again.
func (p *Peer) schedulerOpen(now time.Time) bool {
	b := &p.lazy.sched
	b.mu.Lock()
	if !b.open {
		b.mu.Unlock()
		return false
	}
	if now.Before(b.until) || p.schedulerDown() {
		b.mu.Unlock()
		return true
	}
	b.open = false
	b.mu.Unlock()
	p.lazy.open.Dec()
	p.log.Info("scheduler answers again: lazy reads go through the peer")
	return false
}

// errNoAuth marks a failure to get the credentials a lazy task carries.
var errNoAuth = errors.New("no credentials for the peer path")

// authError reports a refusal for lack of credentials anywhere on the
// peer path: retrying it through the peer only waits for the same answer.
func authError(err error) bool {
	if errors.Is(err, errNoAuth) {
		return true
	}
	var oe *OriginError
	if errors.As(err, &oe) {
		return oe.StatusCode == http.StatusUnauthorized || oe.StatusCode == http.StatusForbidden
	}
	var te *transport.Error
	if errors.As(err, &te) {
		return te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden
	}
	return false
}
