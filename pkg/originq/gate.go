package originq

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Limit is how many requests may be in flight to one host, all priorities
// together, for a request of priority p to start, with n per host in all:
//
//   - Demand: n. A read a container waits on may use every slot.
//   - Prefetch: n-2. Two slots stay free for demand however much
//     prefetch and read-ahead want: prefetch is nearly demand (the files
//     the image says it reads first), so it gets almost everything.
//   - Background: n/2. Background fetch is what makes a layer local
//     before it is needed, but half the slots stay for reads.
//   - Seed: n/4. A seed's whole-blob pulls are bulk transfers that a few
//     streams saturate a link with; more only queue the others.
//
// Each limit is at least 1, so every priority makes progress on an idle
// link. Limits only decrease down the priorities, so a waiter that cannot
// start means none below it can.
func Limit(n int, p Priority) int {
	var l int
	switch p.valid() {
	case Demand:
		l = n
	case Prefetch:
		l = n - 2
	case Background:
		l = n / 2
	case Seed:
		l = n / 4
	}
	return max(l, 1)
}

// Gate admits requests to origin hosts by priority. The zero Gate is not
// usable; a nil *Gate admits everything at once.
type Gate struct {
	n int
	m metrics

	mu    sync.Mutex
	hosts map[string]*host
}

// host is the queue of one origin host; it is dropped when idle, so that a
// daemon that talks to many registries keeps no state for the quiet ones.
type host struct {
	name     string
	inflight int
	queues   [Demand + 1][]*waiter // by priority
}

type waiter struct {
	h       *host
	p       Priority
	since   time.Time
	ready   chan struct{}
	granted bool
	gone    bool // left the queue without a slot
}

// Option configures a Gate.
type Option func(*Gate)

// WithRegisterer registers the gate's metrics with r:
// starling_origin_requests_in_flight{priority},
// starling_origin_requests_queued{priority},
// starling_origin_requests_total{priority} and
// starling_origin_queue_wait_seconds_total{priority}.
func WithRegisterer(r prometheus.Registerer) Option {
	return func(g *Gate) { g.m.reg = r }
}

// New returns a Gate that admits at most n requests in flight per host.
// n <= 0 returns nil: no gate.
func New(n int, opts ...Option) *Gate {
	if n <= 0 {
		return nil
	}
	g := &Gate{n: n, hosts: map[string]*host{}}
	for _, o := range opts {
		o(g)
	}
	g.m.init()
	return g
}

// Acquire waits for a slot to host for a request of priority p and
// returns the function that gives it back (call it once the request's
// body is closed; further calls do nothing). If ctx carries a Level,
// the request waits at the higher of p and the level, and raising the
// level moves it up while it waits. An error (ctx's) means no slot is held.
func (g *Gate) Acquire(ctx context.Context, hostname string, p Priority) (release func(), err error) {
	if g == nil {
		return func() {}, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("origin %s: %w", hostname, err)
	}
	p = p.valid()
	lvl := levelOf(ctx)
	w := &waiter{since: time.Now(), ready: make(chan struct{})}
	g.mu.Lock()
	h := g.hosts[hostname]
	if h == nil {
		h = &host{name: hostname}
		g.hosts[hostname] = h
	}
	w.h = h
	if lvl != nil {
		p = max(p, lvl.register(w, func(np Priority) { g.raise(w, np) }))
		defer lvl.unregister(w)
	}
	w.p = p
	if !g.blockedLocked(h, p) {
		g.grantLocked(w)
		g.mu.Unlock()
		return g.releaser(w), nil
	}
	h.queues[p] = append(h.queues[p], w)
	g.m.queued[p].Inc()
	g.mu.Unlock()

	select {
	case <-w.ready:
		return g.releaser(w), nil
	case <-ctx.Done():
	}
	g.mu.Lock()
	if w.granted {
		// Granted while ctx ended: the slot goes back at once.
		g.mu.Unlock()
		g.releaser(w)()
		return nil, fmt.Errorf("origin %s: %w", hostname, ctx.Err())
	}
	g.removeLocked(w)
	w.gone = true
	g.m.queued[w.p].Dec()
	g.m.waited[w.p].Add(time.Since(w.since).Seconds())
	g.dispatchLocked(h)
	g.dropIfIdleLocked(h)
	g.mu.Unlock()
	return nil, fmt.Errorf("origin %s: %w", hostname, ctx.Err())
}

// blockedLocked reports whether a new request of priority p must queue:
// someone of its priority or above waits already (FIFO), or the host is at
// p's limit.
func (g *Gate) blockedLocked(h *host, p Priority) bool {
	for q := p; q <= Demand; q++ {
		if len(h.queues[q]) > 0 {
			return true
		}
	}
	return h.inflight >= Limit(g.n, p)
}

func (g *Gate) grantLocked(w *waiter) {
	w.granted = true
	w.h.inflight++
	g.m.inflight[w.p].Inc()
	g.m.requests[w.p].Inc()
	g.m.waited[w.p].Add(time.Since(w.since).Seconds())
}

// dispatchLocked starts the waiters that may start now, highest priority
// first, FIFO within one.
func (g *Gate) dispatchLocked(h *host) {
	for _, p := range priorities {
		for len(h.queues[p]) > 0 {
			if h.inflight >= Limit(g.n, p) {
				// Limits fall with the priority: nobody below may start.
				return
			}
			w := h.queues[p][0]
			h.queues[p][0] = nil
			h.queues[p] = h.queues[p][1:]
			g.m.queued[p].Dec()
			g.grantLocked(w)
			close(w.ready)
		}
	}
}

func (g *Gate) removeLocked(w *waiter) {
	q := w.h.queues[w.p]
	for i, x := range q {
		if x == w {
			copy(q[i:], q[i+1:])
			q[len(q)-1] = nil
			w.h.queues[w.p] = q[:len(q)-1]
			return
		}
	}
}

func (g *Gate) dropIfIdleLocked(h *host) {
	if h.inflight > 0 {
		return
	}
	for _, q := range h.queues {
		if len(q) > 0 {
			return
		}
	}
	if g.hosts[h.name] == h {
		delete(g.hosts, h.name)
	}
}

// raise moves a waiting request to priority p (its Level was raised).
func (g *Gate) raise(w *waiter, p Priority) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if w.granted || w.gone || p <= w.p {
		return
	}
	g.removeLocked(w)
	g.m.queued[w.p].Dec()
	w.p = p
	w.h.queues[p] = append(w.h.queues[p], w)
	g.m.queued[p].Inc()
	g.dispatchLocked(w.h)
}

func (g *Gate) releaser(w *waiter) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			defer g.mu.Unlock()
			w.h.inflight--
			g.m.inflight[w.p].Dec()
			g.dispatchLocked(w.h)
			g.dropIfIdleLocked(w.h)
		})
	}
}

// InFlight returns the requests in flight to host and those waiting,
// by priority (tests, status).
func (g *Gate) InFlight(hostname string) (inflight int, queued map[Priority]int) {
	queued = map[Priority]int{}
	if g == nil {
		return 0, queued
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	h := g.hosts[hostname]
	if h == nil {
		return 0, queued
	}
	for _, p := range priorities {
		if n := len(h.queues[p]); n > 0 {
			queued[p] = n
		}
	}
	return h.inflight, queued
}

// metrics are the gate's, per priority, registered when a Registerer was given.
type metrics struct {
	reg              prometheus.Registerer
	inflight, queued [Demand + 1]prometheus.Gauge
	requests         [Demand + 1]prometheus.Counter
	waited           [Demand + 1]prometheus.Counter
}

func (m *metrics) init() {
	inflight := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "starling_origin_requests_in_flight",
		Help: "Requests to origin hosts in flight, by priority (demand, prefetch, background, seed).",
	}, []string{"priority"})
	queued := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "starling_origin_requests_queued",
		Help: "Requests waiting for a slot to their origin host, by priority.",
	}, []string{"priority"})
	requests := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "starling_origin_requests_total",
		Help: "Requests admitted to origin hosts, by priority.",
	}, []string{"priority"})
	waited := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "starling_origin_queue_wait_seconds_total",
		Help: "Time requests waited for a slot to their origin host, by priority.",
	}, []string{"priority"})
	for _, p := range priorities {
		m.inflight[p] = inflight.WithLabelValues(p.String())
		m.queued[p] = queued.WithLabelValues(p.String())
		m.requests[p] = requests.WithLabelValues(p.String())
		m.waited[p] = waited.WithLabelValues(p.String())
	}
	if m.reg != nil {
		for _, c := range []prometheus.Collector{inflight, queued, requests, waited} {
			// A second gate on one registry (a test running two daemons
			// in one process) keeps its numbers to itself.
			_ = m.reg.Register(c)
		}
	}
}
