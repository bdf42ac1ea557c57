package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"google.golang.org/grpc"

	"github.com/starling-dev/starling/internal/version"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/layer"
	"github.com/starling-dev/starling/pkg/registry"
	"github.com/starling-dev/starling/pkg/remote"
	"github.com/starling-dev/starling/pkg/snapshot"
)

func init() {
	components = append(components, component{name: "snapshotter", start: startSnapshotter})
}

// startSnapshotter serves containerd's snapshots API on a unix socket, so
// that containerd loads starling as the proxy plugin "starling".
func startSnapshotter(ctx context.Context, cfg config.Daemon, d *daemon) (func(context.Context) error, error) {
	if !cfg.Snapshotter.Enable {
		return nil, nil
	}
	client := registry.New(cfg.Resolver, registry.WithUserAgent("starlingd/"+version.Version))
	lo := layer.Options{
		Root:       filepath.Join(cfg.Root, "lazy"),
		Registry:   client,
		FS:         cfg.FS,
		Logger:     slog.Default(),
		Registerer: d.metrics,
	}
	if d.peer != nil && cfg.Peer.Lazy && len(cfg.Peer.Schedulers) > 0 {
		lo.Fetcher = p2pFetchers(d.peer, client, d.gate)
		slog.Info("lazy layers read through the P2P peer")
	} else if d.gate != nil {
		lo.Fetcher = gatedFetchers(client, d.gate)
	}
	layers, err := layer.NewManager(lo)
	if err != nil {
		return nil, err
	}
	// What `starling status` shows: the lazy filesystem's read mode and
	// every open layer with what reading it has cost.
	d.health.HandleFunc("/status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(layers.Status())
	})
	fs := remote.New(client, layers, remote.Options{Logger: slog.Default()})
	sn, err := snapshot.New(ctx, filepath.Join(cfg.Root, "snapshotter"), fs, slog.Default())
	if err != nil {
		_ = fs.Close()
		_ = layers.Close()
		return nil, err
	}
	closeAll := func() error {
		err := sn.Close()
		return errors.Join(err, fs.Close(), layers.Close())
	}
	addr := cfg.Snapshotter.Address
	if err := os.MkdirAll(filepath.Dir(addr), 0o711); err != nil {
		_ = closeAll()
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	// A socket left by a daemon that died would make Listen fail.
	if err := os.Remove(addr); err != nil && !errors.Is(err, os.ErrNotExist) {
		_ = closeAll()
		return nil, fmt.Errorf("remove stale socket %s: %w", addr, err)
	}
	l, err := net.Listen("unix", addr)
	if err != nil {
		_ = closeAll()
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	go func() {
		if err := srv.Serve(l); err != nil {
			slog.Error("snapshots API stopped", "err", err)
		}
	}()
	slog.Info("snapshotter serving", "address", addr, "root", cfg.Root)
	return func(ctx context.Context) error {
		// containerd may hold a call open (a prepare waiting on a mount, a
		// cleanup): past ctx the server stops without waiting for it.
		stopped := make(chan struct{})
		go func() { srv.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-ctx.Done():
			slog.Warn("snapshotter calls still running at shutdown: stopping them")
			srv.Stop()
			<-stopped
		}
		err := closeAll()
		_ = os.Remove(addr)
		return err
	}, nil
}
