// Command starling is the command line of starling: convert, inspect, pull,
// get, preheat, setup and bench.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/internal/version"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/registry"
)

// globals are the flags every subcommand shares.
type globals struct {
	configPath string
	plainHTTP  bool
	output     string
	logLevel   string
	// The cluster identity for the schedulers (over the configuration's [cluster]).
	clusterCA, clusterCert, clusterKey string
}

var g globals

// subcommands is filled by the init functions of the files beside this one,
// one file per subcommand.
var subcommands []func() *cobra.Command

func main() {
	root := &cobra.Command{
		Use:           "starling",
		Short:         "Lazy-pulling and peer-to-peer distribution of container images",
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			if g.output != "text" && g.output != "json" {
				return fmt.Errorf("--output must be text or json, not %q", g.output)
			}
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})))
			return nil
		},
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.configPath, "config", config.DefaultPath, "configuration file (its [resolver] section sets registry hosts and mirrors)")
	pf.BoolVar(&g.plainHTTP, "plain-http", false, "reach every registry over plain HTTP")
	pf.StringVarP(&g.output, "output", "o", "text", "output format: text or json")
	pf.StringVar(&g.logLevel, "log-level", "warn", "log level: debug, info, warn, error")
	pf.StringVar(&g.clusterCA, "cluster-ca", "", "cluster CA certificate for talking to the schedulers (default: the configuration's cluster.ca)")
	pf.StringVar(&g.clusterCert, "cluster-cert", "", "cluster certificate of this client (default: the configuration's cluster.cert)")
	pf.StringVar(&g.clusterKey, "cluster-key", "", "key of --cluster-cert (default: the configuration's cluster.key)")
	for _, mk := range subcommands {
		root.AddCommand(mk())
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := root.ExecuteContext(ctx)
	stop()
	if err != nil {
		// One line that says what and where; the wrapped chain carries the where.
		fmt.Fprintln(os.Stderr, "starling:", err)
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		os.Exit(1)
	}
}

// exitError carries a specific exit status.
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string { return e.err.Error() }
func (e exitError) Unwrap() error { return e.err }

// loadConfig reads the configuration; a file named explicitly must exist.
// --plain-http goes into the resolver section, which decides per host how
// every registry client of the command reaches it.
func loadConfig(cmd *cobra.Command) (config.Daemon, error) {
	cfg, err := config.Load(g.configPath, cmd.Flags().Changed("config"))
	cfg.Resolver.PlainHTTP = cfg.Resolver.PlainHTTP || g.plainHTTP
	return cfg, err
}

// registryClient builds the registry client from the configuration and flags.
func registryClient(cmd *cobra.Command) (*registry.Client, error) {
	cfg, err := loadConfig(cmd)
	if err != nil {
		return nil, err
	}
	return registry.New(cfg.Resolver, registry.WithUserAgent("starling/"+version.Version)), nil
}
