package config

import (
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// SchedulerPath is where starling-scheduler looks for its configuration.
const SchedulerPath = "/etc/starling/scheduler.toml"

// Scheduler is the whole configuration of starling-scheduler.
type Scheduler struct {
	// Listen serves the gRPC API the peers use.
	Listen string `toml:"listen"`
	// HTTPListen serves the HTTP API (preheat, task status), /metrics,
	// /healthy and /server/ping; empty turns it off.
	HTTPListen string `toml:"http_listen"`
	// LogLevel is one of debug, info, warn, error.
	LogLevel string `toml:"log_level"`
	// PeerTTL: a peer not heard from for this long is ignored (not offered
	// as a parent, its origin fetches given to others) and then purged.
	// Peers announce every second by default, so 10 s rides out a few lost
	// heartbeats or a long pause, while a dead parent or a dead origin
	// fetcher holds the others back for 10 s at most.
	PeerTTL time.Duration `toml:"peer_ttl"`
	// FetchTTL: an origin fetch of a piece not reported done within this
	// long is given to the next peer that asks. A dead fetcher is caught
	// sooner by PeerTTL, so this only catches live but stuck ones. It must
	// exceed the time one piece takes on the slowest link, or the origin
	// serves that piece twice: 4 MiB at 8 pieces in parallel over a
	// 10 Mbit/s link is about 27 s, hence 60 s.
	FetchTTL time.Duration `toml:"fetch_ttl"`
	// MaxParents is how many parents are offered per piece; the peer
	// spreads its requests over them.
	MaxParents int `toml:"max_parents"`
	// MaxOriginFetchers is how many plain (non-seed) peers may fetch one
	// whole blob from the origin at once; the others take its pieces from
	// them. Without a bound every peer that starts fetches its first
	// pieces from the origin itself.
	MaxOriginFetchers int `toml:"max_origin_fetchers"`
	// StartGrace: for this long after the scheduler starts, no origin
	// fetch of a whole blob is handed out, so that peers re-announce what
	// they hold first and a restart does not refetch it ("-1s": off).
	StartGrace time.Duration `toml:"start_grace"`
	// Preheat bounds what POST /api/v1/preheat may start.
	Preheat SchedulerPreheat `toml:"preheat"`
	// GCInterval is how often dead peers and abandoned tasks are purged
	// from memory.
	GCInterval time.Duration `toml:"gc_interval"`
	// Cluster is the scheduler's cluster identity (mutual TLS).
	Cluster Cluster `toml:"cluster"`
}

// DefaultScheduler returns the configuration used when no file is given.
func DefaultScheduler() Scheduler {
	return Scheduler{
		Listen:     ":8002",
		HTTPListen: "127.0.0.1:8080",
		LogLevel:   "info",
		PeerTTL:    10 * time.Second,
		FetchTTL:   60 * time.Second,
		MaxParents: 4,
		GCInterval: 30 * time.Second,
		// One seed plus two others keeps the origin link busy while
		// every other peer trades pieces.
		MaxOriginFetchers: 2,
		// Peers announce every second; three cover a lost heartbeat.
		StartGrace: 3 * time.Second,
	}
}

// LoadScheduler reads path over the defaults, like Load.
func LoadScheduler(path string, mustExist bool) (Scheduler, error) {
	cfg := DefaultScheduler()
	if err := decodeFile(path, mustExist, &cfg); err != nil {
		return cfg, err
	}
	return cfg, nil
}

// Validate reports the first value the scheduler cannot run with.
func (c Scheduler) Validate() error {
	var errs []error
	if c.Listen == "" {
		errs = append(errs, errors.New("listen: empty"))
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.LogLevel)); err != nil {
		errs = append(errs, fmt.Errorf("log_level %q: %w", c.LogLevel, err))
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"peer_ttl", c.PeerTTL}, {"fetch_ttl", c.FetchTTL}, {"gc_interval", c.GCInterval}} {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("%s: %s is not positive", d.name, d.v))
		}
	}
	if c.MaxOriginFetchers <= 0 {
		errs = append(errs, fmt.Errorf("max_origin_fetchers: %d is not positive", c.MaxOriginFetchers))
	}
	if err := c.Cluster.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.MaxParents <= 0 {
		errs = append(errs, fmt.Errorf("max_parents: %d is not positive", c.MaxParents))
	}
	return errors.Join(errs...)
}

// SchedulerPreheat is the [preheat] section of scheduler.toml.
type SchedulerPreheat struct {
	// AllowedRegistries are the host patterns (as proxy.allowed_registries)
	// of the URLs a preheat may name; empty: any host on ports 80 and 443,
	// never a loopback, link-local or metadata address.
	AllowedRegistries []string `toml:"allowed_registries"`
}
