// Command starling-scheduler coordinates the peers of a starling P2P network.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"github.com/starling-dev/starling/internal/version"
	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/scheduler"
	"github.com/starling-dev/starling/pkg/serve"
)

// openHTTPPaths are served without a client certificate when TLS is on.
var openHTTPPaths = []string{"/healthy", "/server/ping", "/metrics"}

// shutdownTimeout bounds a clean stop; calls are answered from memory, so
// anything still running after this is a stuck client.
const shutdownTimeout = 5 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newCommand().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "starling-scheduler:", err)
		stop()
		os.Exit(1)
	}
}

func newCommand() *cobra.Command {
	var (
		configPath string
		cfg        config.Scheduler
	)
	cmd := &cobra.Command{
		Use:           "starling-scheduler",
		Short:         "starling P2P scheduler: tells peers where each piece is and who fetches it from the origin",
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fileCfg, err := config.LoadScheduler(configPath, cmd.Flags().Changed("config"))
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
			set("listen", func() { fileCfg.Listen = cfg.Listen })
			set("http", func() { fileCfg.HTTPListen = cfg.HTTPListen })
			set("log-level", func() { fileCfg.LogLevel = cfg.LogLevel })
			set("cluster-ca", func() { fileCfg.Cluster.CA = cfg.Cluster.CA })
			set("cluster-cert", func() { fileCfg.Cluster.Cert = cfg.Cluster.Cert })
			set("cluster-key", func() { fileCfg.Cluster.Key = cfg.Cluster.Key })
			set("insecure", func() { fileCfg.Cluster.Insecure = cfg.Cluster.Insecure })
			if err := fileCfg.Validate(); err != nil {
				return fmt.Errorf("configuration: %w", err)
			}
			return run(cmd.Context(), fileCfg)
		},
	}
	cmd.SetVersionTemplate("starling-scheduler {{.Version}}\n")
	cmd.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "print the version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintln(cmd.OutOrStdout(), "starling-scheduler", version.Version)
		},
	})
	d := config.DefaultScheduler()
	f := cmd.Flags()
	f.StringVar(&configPath, "config", config.SchedulerPath, "TOML configuration file (optional)")
	f.StringVar(&cfg.Listen, "listen", d.Listen, "gRPC address the peers use")
	f.StringVar(&cfg.HTTPListen, "http", d.HTTPListen, "HTTP API, /metrics and health address (empty: off)")
	f.StringVar(&cfg.LogLevel, "log-level", d.LogLevel, "log level: debug, info, warn, error")
	f.StringVar(&cfg.Cluster.CA, "cluster-ca", "", "cluster CA certificate: peers and clients must show a certificate from it (empty: plaintext)")
	f.StringVar(&cfg.Cluster.Cert, "cluster-cert", "", "the scheduler's cluster certificate (starling cluster issue --scheduler)")
	f.StringVar(&cfg.Cluster.Key, "cluster-key", "", "key of --cluster-cert")
	f.BoolVar(&cfg.Cluster.Insecure, "insecure", false, "allow plaintext on listeners beyond loopback")
	return cmd
}

func run(ctx context.Context, cfg config.Scheduler) error {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		return fmt.Errorf("log level %q: %w", cfg.LogLevel, err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	slog.SetDefault(log)
	cl, err := cluster.Load(cfg.Cluster)
	if err != nil {
		return err
	}
	if cl.Enabled() {
		if id := cl.Identity(); !id.Has(cluster.RoleScheduler) {
			return fmt.Errorf("the cluster certificate %q has roles %v, no scheduler (issue it with --scheduler)", id.Name, id.Roles)
		}
	} else {
		if err := cluster.CheckPlaintext(cfg.Cluster, cfg.Listen, cfg.HTTPListen); err != nil {
			return err
		}
		log.Warn("running without cluster TLS: whoever reaches the scheduler can announce, take work and preheat",
			"grpc", cfg.Listen, "http", cfg.HTTPListen, "insecure", cfg.Cluster.Insecure)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	sched := scheduler.New(scheduler.Options{PeerTTL: cfg.PeerTTL, FetchTTL: cfg.FetchTTL, MaxParents: cfg.MaxParents,
		MaxOriginFetchers: cfg.MaxOriginFetchers, StartGrace: cfg.StartGrace})
	srv, err := scheduler.NewServer(sched, scheduler.ServerOptions{Registry: reg, Logger: log,
		PreheatAllowed: cfg.Preheat.AllowedRegistries})
	if err != nil {
		return err
	}

	// Connections per client address and in all are bounded, so that one
	// client's idle connections cannot starve the peers (pkg/serve).
	gl, err := serve.Listen(cfg.Listen, serve.Limits{PerClient: serve.DefaultLimits.PerClient, Total: 16384})
	if err != nil {
		return fmt.Errorf("gRPC listen %s: %w", cfg.Listen, err)
	}
	// Message size, streams, keepalive and a rate limit per client; the
	// rate limit comes first, so that a flood costs no TLS identity work.
	gopts := scheduler.GRPCServerOptions()
	if cl.Enabled() {
		// Every call needs a member's certificate; a call that speaks for
		// a peer must come from that peer's certificate.
		gopts = append(gopts, grpc.Creds(cluster.ServerCredentials(cl)), grpc.ChainUnaryInterceptor(cluster.UnaryServerInterceptor()))
	}
	g := grpc.NewServer(gopts...)
	srv.RegisterGRPC(g)
	errc := make(chan error, 2)
	go func() {
		if err := g.Serve(gl); err != nil {
			errc <- fmt.Errorf("gRPC server on %s: %w", gl.Addr(), err)
		}
	}()

	var hs *http.Server
	httpAddr := ""
	if cfg.HTTPListen != "" {
		hl, err := serve.Listen(cfg.HTTPListen, serve.DefaultLimits)
		if err != nil {
			g.Stop()
			return fmt.Errorf("HTTP listen %s: %w", cfg.HTTPListen, err)
		}
		httpAddr = hl.Addr().String()
		h := srv.HTTPHandler()
		if cl.Enabled() {
			// The API (preheat, task status) needs a member's certificate;
			// health and metrics stay open to probes and Prometheus.
			hl = tls.NewListener(hl, cl.ServerTLSOptionalClient())
			h = cluster.RequireMember(h, openHTTPPaths...)
		}
		hs = serve.HTTPServer(h)
		// Failed handshakes of strangers: debug, so knocking cannot flood the log.
		hs.ErrorLog = slog.NewLogLogger(log.Handler(), slog.LevelDebug)
		go func() {
			if err := hs.Serve(hl); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("HTTP server on %s: %w", hl.Addr(), err)
			}
		}()
	}

	gcCtx, stopGC := context.WithCancel(ctx)
	gcDone := make(chan struct{})
	go func() { defer close(gcDone); srv.RunGC(gcCtx, cfg.GCInterval) }()

	log.Info("starling-scheduler ready", "version", version.Version, "grpc", gl.Addr().String(), "http", httpAddr, "tls", cl.Enabled(),
		"peer_ttl", cfg.PeerTTL, "fetch_ttl", cfg.FetchTTL, "max_parents", cfg.MaxParents)
	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case runErr = <-errc:
		log.Error("server failed, shutting down", "err", runErr)
	}
	stopGC()
	<-gcDone
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if hs != nil {
		if err := hs.Shutdown(sctx); err != nil {
			log.Warn("HTTP shutdown", "err", err)
		}
	}
	stopped := make(chan struct{})
	go func() { g.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-sctx.Done():
		g.Stop()
		<-stopped
	}
	return runErr
}
