package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/originq"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/storage"
)

func init() {
	// peer.go's init runs before snapshotter.go's, so the snapshotter
	// finds the peer in the daemon when it starts.
	components = append(components, component{name: "peer", start: startPeer})
}

func peerOptions(cfg config.Daemon, reg prometheus.Registerer) (peer.Options, error) {
	switch cfg.Peer.Role {
	case "peer", "seed":
	default:
		return peer.Options{}, fmt.Errorf("peer role %q: want peer or seed", cfg.Peer.Role)
	}
	return peer.Options{
		Root:              filepath.Join(cfg.Root, "peer"),
		Seed:              cfg.Peer.Role == "seed",
		Schedulers:        cfg.Peer.Schedulers,
		AdvertiseIP:       cfg.Peer.AdvertiseIP,
		UploadListen:      cfg.Peer.UploadListen,
		UploadConcurrency: cfg.Peer.UploadConcurrency,
		UploadRate:        cfg.Peer.UploadRateLimit,
		PieceSize:         cfg.Peer.PieceSize,
		Concurrency:       cfg.Peer.Concurrency,
		PieceTimeout:      cfg.Peer.PieceTimeout,
		LazyFallbackAfter: cfg.Peer.LazyFallbackAfter,
		LazyFallbackFor:   cfg.Peer.LazyFallbackFor,
		AnnounceInterval:  cfg.Peer.AnnounceInterval,
		Zone:              cfg.Peer.Zone,
		Rack:              cfg.Peer.Rack,
		Storage: storage.Options{Quota: cfg.Storage.Quota, HighWatermark: cfg.Storage.HighWatermark,
			LowWatermark: cfg.Storage.LowWatermark, MaxAge: cfg.Storage.MaxAge},
		// Origin fetches never go through an HTTP proxy from the
		// environment: it may well point at this daemon's own proxy.
		Client:     &http.Client{Transport: originTransport()},
		Logger:     slog.Default(),
		Registerer: reg,
	}, nil
}

func originTransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil
	t.MaxIdleConnsPerHost = 32
	return t
}

// startPeer runs the P2P peer: upload server, scheduler client and the
// proxy / registry mirror.
func startPeer(ctx context.Context, cfg config.Daemon, d *daemon) (func(context.Context) error, error) {
	if !cfg.Peer.Enable {
		return nil, nil
	}
	o, err := peerOptions(cfg, d.metrics)
	if err != nil {
		return nil, err
	}
	// The peer's origin requests share the daemon's gate with the lazy
	// reads. A seed's are whole blobs for the cluster: Seed priority,
	// unless the request's context says otherwise. A plain peer's are
	// downloads a client waits on.
	prio := originq.Demand
	if o.Seed {
		prio = originq.Seed
	}
	o.Client.Transport = originq.Transport(d.gate, o.Client.Transport, prio)
	p, err := peer.New(o)
	if err != nil {
		return nil, err
	}
	if err := p.Start(ctx); err != nil {
		p.Close()
		return nil, err
	}
	d.peer = p
	stopProxy, err := startProxy(cfg, d, p)
	if err != nil {
		p.Close()
		return nil, err
	}
	slog.Info("peer started", "id", p.ID(), "role", cfg.Peer.Role, "upload", p.UploadAddr(),
		"schedulers", cfg.Peer.Schedulers, "proxy", cfg.Proxy.Listen)
	return func(ctx context.Context) error {
		if stopProxy != nil {
			_ = stopProxy(ctx)
		}
		return p.Close()
	}, nil
}
