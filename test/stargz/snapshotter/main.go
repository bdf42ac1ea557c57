// Command snapshotter is containerd-stargz-grpc cut down to what the test
// needs: the stargz snapshotter service of github.com/containerd/stargz-snapshotter
// on a unix socket, configured by the same TOML file (its resolver section
// included, so mirrors are configured exactly as users configure them).
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "snapshotter:", err)
		os.Exit(1)
	}
}

func run() error {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "unix socket to serve the snapshots API on")
	configPath := flag.String("config", "/etc/containerd-stargz-grpc/config.toml", "configuration file")
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "state directory")
	level := flag.String("log-level", "info", "log level")
	flag.Parse()

	lvl, err := logrus.ParseLevel(*level)
	if err != nil {
		return err
	}
	logrus.SetLevel(lvl)
	logrus.SetOutput(os.Stderr)

	var cfg service.Config
	if _, err := os.Stat(*configPath); err == nil {
		tree, err := toml.LoadFile(*configPath)
		if err != nil {
			return fmt.Errorf("load %s: %w", *configPath, err)
		}
		if err := tree.Unmarshal(&cfg); err != nil {
			return fmt.Errorf("parse %s: %w", *configPath, err)
		}
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	sn, err := service.NewStargzSnapshotterService(ctx, *root, &cfg)
	if err != nil {
		return fmt.Errorf("stargz snapshotter: %w", err)
	}
	defer sn.Close()

	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		return err
	}
	_ = os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- rpc.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		rpc.GracefulStop()
		return nil
	}
}
