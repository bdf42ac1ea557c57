package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/proxy"
)

// startProxy serves the proxy / registry mirror on proxy.listen.
func startProxy(_ context.Context, cfg config.Daemon, p *peer.Peer) (func(context.Context) error, error) {
	if cfg.Proxy.Listen == "" {
		return nil, nil
	}
	o := proxy.FromConfig(cfg.Proxy, cfg.Resolver)
	o.Logger = slog.Default()
	o.Registerer = prometheus.DefaultRegisterer
	x, err := proxy.New(o, p)
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", cfg.Proxy.Listen)
	if err != nil {
		return nil, fmt.Errorf("proxy listen %s: %w", cfg.Proxy.Listen, err)
	}
	srv := &http.Server{Handler: x, ReadHeaderTimeout: 30 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			slog.Error("proxy stopped", "addr", cfg.Proxy.Listen, "err", err)
		}
	}()
	return srv.Shutdown, nil
}
