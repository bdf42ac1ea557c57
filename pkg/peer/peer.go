// Package peer is the P2P peer of starlingd: it downloads tasks piece by
// piece from the parents the scheduler names, or from the origin when the
// scheduler says so (or is unreachable), verifies every piece against its
// digest before storing it, reports what it holds, and serves its pieces to
// other peers from the upload server.
package peer

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/starling-dev/starling/pkg/serve"
	"github.com/starling-dev/starling/pkg/storage"
)

// Peer is a starling P2P peer: task storage, downloads, upload server and
// scheduler client. It is safe for concurrent use.
type Peer struct {
	o     Options
	id    string
	log   *slog.Logger
	m     *metrics
	lazy  *lazyShared
	store *storage.Store
	sched *schedClient // nil: standalone
	up    *uploader
	// parentClient and rangeClient fetch pieces and ranges from parents
	// (over TLS when Options.ClientTLS is set).
	parentClient, rangeClient *http.Client
	// flights are this peer's claimed origin range fetches, which its
	// upload server streams to others; reports queues held ranges for the
	// scheduler (ranges.go, flight.go).
	flights flights
	reports chan rangeReport

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// The announce loop stops before Leave, so that no heartbeat in flight
	// brings the peer back to life at the scheduler after it left.
	stopAnnounce context.CancelFunc
	announceDone chan struct{}

	mu    sync.Mutex
	tasks map[string]*task
}

// New opens the peer's storage under o.Root. Nothing listens until Start.
func New(o Options) (*Peer, error) {
	if o.Root == "" {
		return nil, errors.New("peer: no root directory")
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 8
	}
	if o.UploadConcurrency <= 0 {
		o.UploadConcurrency = 8
	}
	if o.AnnounceInterval <= 0 {
		o.AnnounceInterval = time.Second
		if o.Seed {
			// Work for a seed arrives with the answer to a heartbeat, and
			// the peers that asked for it wait meanwhile.
			o.AnnounceInterval = 250 * time.Millisecond
		}
	}
	if o.PieceTimeout <= 0 {
		o.PieceTimeout = 30 * time.Second
	}
	if o.LazyFallbackAfter <= 0 {
		o.LazyFallbackAfter = 2 * time.Second
	}
	if o.LazyFallbackFor <= 0 {
		o.LazyFallbackFor = 30 * time.Second
	}
	if o.Client == nil {
		o.Client = http.DefaultClient
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Registerer == nil {
		// A private registry, so several peers fit in one process (tests,
		// starling get --standalone).
		o.Registerer = prometheus.NewRegistry()
	}
	if err := os.MkdirAll(o.Root, 0o700); err != nil {
		return nil, fmt.Errorf("peer root %s: %w", o.Root, err)
	}
	id := o.ID
	if id == "" {
		var err error
		if id, err = loadID(filepath.Join(o.Root, "peer-id")); err != nil {
			return nil, err
		}
	}
	store, err := storage.Open(filepath.Join(o.Root, "tasks"), o.Storage)
	if err != nil {
		return nil, fmt.Errorf("peer storage in %s: %w", o.Root, err)
	}
	m, err := newMetrics(o.Registerer)
	if err != nil {
		store.Close()
		return nil, err
	}
	lazy, err := newLazyShared(o.Registerer)
	if err != nil {
		store.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Peer{o: o, id: id, log: o.Logger.With("peer", id), m: m, lazy: lazy, store: store,
		ctx: ctx, cancel: cancel, tasks: map[string]*task{}, reports: make(chan rangeReport, 4096)}
	p.parentClient, p.rangeClient = newParentClients(o.ClientTLS)
	if len(o.Schedulers) > 0 {
		p.sched = newSchedClient(p, o.Schedulers)
	}
	return p, nil
}

// loadID reads the peer's ID, making one on first start: a restarted peer
// keeps its ID, so the scheduler's view of what it holds stays right.
func loadID(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err == nil && len(strings.TrimSpace(string(b))) > 0 {
		return strings.TrimSpace(string(b)), nil
	}
	host, _ := os.Hostname()
	var r [6]byte
	_, _ = rand.Read(r[:])
	id := host + "-" + hex.EncodeToString(r[:])
	if err := os.WriteFile(path, []byte(id+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("save peer ID: %w", err)
	}
	return id, nil
}

// schedulerTLS is the client configuration for the schedulers (nil: plaintext).
func (p *Peer) schedulerTLS() *tls.Config {
	if p.o.SchedulerTLS != nil {
		return p.o.SchedulerTLS
	}
	return p.o.ClientTLS
}

// ID is the peer's ID.
func (p *Peer) ID() string { return p.id }

// Seed reports whether this is a seed peer.
func (p *Peer) Seed() bool { return p.o.Seed }

// Start listens for uploads, starts announcing to the schedulers, resumes
// the downloads a previous run left unfinished and collects garbage.
func (p *Peer) Start(ctx context.Context) error {
	if p.o.UploadListen != "" {
		addr := p.o.UploadListen
		if host, port, err := net.SplitHostPort(addr); err == nil && host == "" {
			// No address given (":4000"): the one other peers are told,
			// not every interface of the node.
			ip := p.o.AdvertiseIP
			if ip == "" {
				ip = advertiseIP("")
			}
			addr = net.JoinHostPort(ip, port)
		}
		l, err := serve.Listen(addr, serve.DefaultLimits)
		if err != nil {
			return fmt.Errorf("upload server on %s: %w", addr, err)
		}
		if p.o.UploadTLS != nil {
			l = tls.NewListener(l, p.o.UploadTLS)
		}
		p.up = newUploader(p, l)
		p.wg.Add(1)
		go func() { defer p.wg.Done(); p.up.serve() }()
	}
	p.announceDone = make(chan struct{})
	if p.sched != nil {
		actx, cancel := context.WithCancel(p.ctx)
		p.stopAnnounce = cancel
		go func() { defer close(p.announceDone); p.sched.announceLoop(actx) }()
	} else {
		close(p.announceDone)
	}
	if p.sched != nil {
		p.wg.Add(1)
		go func() { defer p.wg.Done(); p.reportLoop(p.ctx) }()
	}
	p.wg.Add(2)
	go func() { defer p.wg.Done(); p.gcLoop(p.ctx) }()
	go func() { defer p.wg.Done(); p.flushLoop(p.ctx) }()
	p.resume()
	return nil
}

func (p *Peer) gcLoop(ctx context.Context) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			for _, id := range p.store.GC(now) {
				removeRequest(p.o.Root, id)
				p.log.Info("task collected", "task", id)
			}
		}
	}
}

// UploadAddr is the address the upload server listens at ("" when none).
func (p *Peer) UploadAddr() string {
	if p.up == nil {
		return ""
	}
	return p.up.l.Addr().String()
}

// Close stops the peer and tells the schedulers it is gone.
func (p *Peer) Close() error {
	if p.stopAnnounce != nil {
		p.stopAnnounce()
	}
	if p.announceDone != nil {
		<-p.announceDone
	}
	if p.sched != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		p.sched.leave(ctx)
		cancel()
	}
	p.cancel()
	if p.up != nil {
		p.up.close()
	}
	p.wg.Wait()
	// The clients are this peer's own: their kept connections end with it.
	p.parentClient.CloseIdleConnections()
	p.rangeClient.CloseIdleConnections()
	if p.sched != nil {
		_ = p.sched.Close()
	}
	return p.store.Close()
}
