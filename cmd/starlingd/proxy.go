package main

import (
	"context"

	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/peer"
)

// startProxy serves the proxy / registry mirror (pkg/proxy lands next).
func startProxy(ctx context.Context, cfg config.Daemon, p *peer.Peer) (func(context.Context) error, error) {
	return nil, nil
}
