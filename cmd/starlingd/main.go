// Command starlingd is starling's node agent: the containerd remote
// snapshotter and the P2P peer in one process; either part can be switched off.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/internal/version"
	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/originq"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/serve"
)

// component is a part of the daemon started from the configuration; its
// stop function is called once on shutdown.
type component struct {
	name  string
	start func(ctx context.Context, cfg config.Daemon, d *daemon) (stop func(context.Context) error, err error)
}

// components is filled by the init functions of snapshotter.go and peer.go.
var components []component

// daemon holds what components share: the health server's mux, for one.
type daemon struct {
	health *http.ServeMux
	// metrics is the registry of this run's components, served on /metrics
	// beside the process-wide default one: a second run in one process (a
	// test) registers its metrics afresh instead of clashing.
	metrics *prometheus.Registry
	// peer is the P2P peer when it runs; the snapshotter reads layers through it.
	peer *peer.Peer
	// gate shares each origin host among this daemon's work by priority:
	// lazy reads, prefetch, background fetch and the peer's origin
	// fetches ([origin] max_requests_per_host; nil when 0).
	gate *originq.Gate
	// cluster is the node's cluster identity (nil: plaintext).
	cluster *cluster.Cluster
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newCommand(run).ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "starlingd:", err)
		stop()
		os.Exit(1)
	}
}

// newCommand is starlingd's command line: it loads the configuration,
// applies the flags the user set over it and hands the result to run.
func newCommand(run func(context.Context, config.Daemon) error) *cobra.Command {
	var (
		configPath  string
		cfg         config.Daemon
		schedulers  string
		snapshotter bool
		peerOn      bool
	)
	cmd := &cobra.Command{
		Use:           "starlingd",
		Short:         "starling node agent: containerd remote snapshotter and P2P peer",
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fileCfg, err := config.Load(configPath, cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			// Flags override the file: apply only those the user set.
			f := cmd.Flags()
			set := func(name string, apply func()) {
				if f.Changed(name) {
					apply()
				}
			}
			set("root", func() { fileCfg.Root = cfg.Root })
			set("address", func() { fileCfg.Snapshotter.Address = cfg.Snapshotter.Address })
			set("log-level", func() { fileCfg.LogLevel = cfg.LogLevel })
			set("metrics-listen", func() { fileCfg.MetricsListen = cfg.MetricsListen })
			set("health-listen", func() { fileCfg.HealthListen = cfg.HealthListen })
			set("role", func() { fileCfg.Peer.Role = cfg.Peer.Role })
			set("advertise-ip", func() { fileCfg.Peer.AdvertiseIP = cfg.Peer.AdvertiseIP })
			set("upload-listen", func() { fileCfg.Peer.UploadListen = cfg.Peer.UploadListen })
			set("proxy-listen", func() { fileCfg.Proxy.Listen = cfg.Proxy.Listen })
			set("snapshotter", func() { fileCfg.Snapshotter.Enable = snapshotter })
			set("peer", func() { fileCfg.Peer.Enable = peerOn })
			set("scheduler", func() { fileCfg.Peer.Schedulers = splitList(schedulers) })
			set("cluster-ca", func() { fileCfg.Cluster.CA = cfg.Cluster.CA })
			set("cluster-cert", func() { fileCfg.Cluster.Cert = cfg.Cluster.Cert })
			set("cluster-key", func() { fileCfg.Cluster.Key = cfg.Cluster.Key })
			set("insecure", func() { fileCfg.Cluster.Insecure = cfg.Cluster.Insecure })
			return run(cmd.Context(), fileCfg)
		},
	}
	d := config.Default()
	f := cmd.Flags()
	f.StringVar(&configPath, "config", config.DefaultPath, "TOML configuration file (optional)")
	f.StringVar(&cfg.Root, "root", d.Root, "state directory")
	f.StringVar(&cfg.Snapshotter.Address, "address", d.Snapshotter.Address, "unix socket of the snapshots API")
	f.StringVar(&cfg.LogLevel, "log-level", d.LogLevel, "log level: debug, info, warn, error")
	f.StringVar(&cfg.MetricsListen, "metrics-listen", d.MetricsListen, "Prometheus metrics address (empty: off)")
	f.StringVar(&cfg.HealthListen, "health-listen", d.HealthListen, "health address (/healthy, /server/ping; empty: off)")
	f.StringVar(&cfg.Peer.Role, "role", d.Peer.Role, "P2P role: peer or seed")
	f.StringVar(&schedulers, "scheduler", "", "scheduler addresses HOST:PORT[,HOST:PORT...]")
	f.StringVar(&cfg.Peer.AdvertiseIP, "advertise-ip", d.Peer.AdvertiseIP, "IP other peers reach this one at")
	f.StringVar(&cfg.Peer.UploadListen, "upload-listen", d.Peer.UploadListen, "upload server address (peer to peer)")
	f.StringVar(&cfg.Proxy.Listen, "proxy-listen", d.Proxy.Listen, "HTTP proxy and registry mirror address")
	f.BoolVar(&snapshotter, "snapshotter", d.Snapshotter.Enable, "serve the containerd snapshots API")
	f.BoolVar(&peerOn, "peer", d.Peer.Enable, "run the P2P peer (upload server and proxy)")
	f.StringVar(&cfg.Cluster.CA, "cluster-ca", "", "cluster CA certificate: peers and schedulers talk mutual TLS (empty: plaintext)")
	f.StringVar(&cfg.Cluster.Cert, "cluster-cert", "", "this node's cluster certificate (starling cluster issue)")
	f.StringVar(&cfg.Cluster.Key, "cluster-key", "", "key of --cluster-cert")
	f.BoolVar(&cfg.Cluster.Insecure, "insecure", false, "allow plaintext on an upload listener beyond loopback")
	return cmd
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func run(ctx context.Context, cfg config.Daemon) error {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		return fmt.Errorf("log level %q: %w", cfg.LogLevel, err)
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})))
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	slog.Info("starting starlingd", "version", version.Version, "root", cfg.Root,
		"snapshotter", cfg.Snapshotter.Enable, "peer", cfg.Peer.Enable, "role", cfg.Peer.Role)

	d := &daemon{health: http.NewServeMux(), metrics: prometheus.NewRegistry()}
	if err := startCluster(cfg, d); err != nil {
		return err
	}
	d.gate = originq.New(cfg.Origin.MaxRequestsPerHost, originq.WithRegisterer(d.metrics))
	ok := func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("OK")) }
	d.health.HandleFunc("/healthy", ok)
	d.health.HandleFunc("/server/ping", ok)

	var stops []func(context.Context) error
	var names []string
	shutdown := func() {
		sctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		for i := len(stops) - 1; i >= 0; i-- {
			if err := stops[i](sctx); err != nil {
				slog.Warn("stop", "component", names[i], "err", err)
			}
		}
	}
	for _, c := range components {
		stop, err := c.start(ctx, cfg, d)
		if err != nil {
			shutdown()
			return fmt.Errorf("start %s: %w", c.name, err)
		}
		if stop != nil {
			stops = append(stops, stop)
			names = append(names, c.name)
		}
	}
	serve := func(name, addr string, h http.Handler) error {
		if addr == "" {
			return nil
		}
		stop, err := serveHTTP(name, addr, h)
		if err != nil {
			return err
		}
		stops = append(stops, stop)
		names = append(names, name)
		return nil
	}
	metrics := http.NewServeMux()
	metrics.Handle("/metrics", promhttp.HandlerFor(prometheus.Gatherers{prometheus.DefaultGatherer, d.metrics}, promhttp.HandlerOpts{}))
	if err := serve("metrics", cfg.MetricsListen, metrics); err != nil {
		shutdown()
		return err
	}
	if err := serve("health", cfg.HealthListen, d.health); err != nil {
		shutdown()
		return err
	}
	slog.Info("starlingd ready")
	<-ctx.Done()
	slog.Info("shutting down")
	shutdown()
	return nil
}

// startCluster loads the node's cluster identity (nil: plaintext, which
// the peer checks against its upload listener when it starts).
func startCluster(cfg config.Daemon, d *daemon) error {
	c, err := cluster.Load(cfg.Cluster)
	if err != nil {
		return err
	}
	if c.Enabled() {
		d.cluster = c
		id := c.Identity()
		slog.Info("cluster TLS on", "name", id.Name, "roles", id.Roles, "ca", cfg.Cluster.CA)
	}
	return nil
}

// serveHTTP serves h on addr until the returned stop is called; stop
// returns once the server's goroutine has ended.
func serveHTTP(name, addr string, h http.Handler) (stop func(context.Context) error, err error) {
	// Bounded connections and header/idle timeouts: a client holding
	// connections open cannot starve the others (pkg/serve).
	l, err := serve.Listen(addr, serve.DefaultLimits)
	if err != nil {
		return nil, fmt.Errorf("%s listen %s: %w", name, addr, err)
	}
	srv := serve.HTTPServer(h)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			slog.Error("server stopped", "server", name, "addr", addr, "err", err)
		}
	}()
	return func(ctx context.Context) error {
		err := srv.Shutdown(ctx)
		if err != nil {
			// Connections that outlive ctx are cut, so that Serve returns.
			_ = srv.Close()
		}
		<-done
		return err
	}, nil
}
