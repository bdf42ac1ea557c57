package main

import (
	"context"
	"log/slog"

	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/proxy"
)

// startProxy serves the proxy / registry mirror on proxy.listen.
func startProxy(cfg config.Daemon, d *daemon, p *peer.Peer) (func(context.Context) error, error) {
	if cfg.Proxy.Listen == "" {
		return nil, nil
	}
	o := proxy.FromConfig(cfg.Proxy, cfg.Resolver)
	o.Logger = slog.Default()
	o.Registerer = d.metrics
	x, err := proxy.New(o, p)
	if err != nil {
		return nil, err
	}
	return serveHTTP("proxy", cfg.Proxy.Listen, x)
}
