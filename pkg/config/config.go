// Package config holds the TOML configuration of starlingd and its defaults.
// Every key has a default, so the daemon starts with no file at all; flags
// override what the file says. Each section lives in its own file.
package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sort"
	"strings"

	"github.com/BurntSushi/toml"

	"github.com/starling-dev/starling/pkg/registry"
)

// DefaultPath is where starlingd looks for its configuration.
const DefaultPath = "/etc/starling/starlingd.toml"

// Daemon is the whole configuration of starlingd.
type Daemon struct {
	// Root is the state directory (snapshots, caches, task storage).
	Root string `toml:"root"`
	// LogLevel is one of debug, info, warn, error.
	LogLevel string `toml:"log_level"`
	// MetricsListen serves Prometheus metrics at /metrics.
	MetricsListen string `toml:"metrics_listen"`
	// HealthListen serves /healthy and /server/ping.
	HealthListen string `toml:"health_listen"`

	Resolver    registry.Config `toml:"resolver"`
	Snapshotter Snapshotter     `toml:"snapshotter"`
	FS          FS              `toml:"fs"`
	Peer        Peer            `toml:"peer"`
	Proxy       Proxy           `toml:"proxy"`
	Storage     Storage         `toml:"storage"`
	Origin      Origin          `toml:"origin"`
	Cluster     Cluster         `toml:"cluster"`
}

// Default returns the configuration used when no file is given.
func Default() Daemon {
	return Daemon{
		Root:          "/var/lib/starling",
		LogLevel:      "info",
		MetricsListen: "127.0.0.1:4002",
		HealthListen:  "127.0.0.1:4003",
		Resolver:      registry.DefaultConfig(),
		Snapshotter:   DefaultSnapshotter(),
		FS:            DefaultFS(),
		Peer:          DefaultPeer(),
		Proxy:         DefaultProxy(),
		Storage:       DefaultStorage(),
		Origin:        DefaultOrigin(),
	}
}

// Load reads path over the defaults. A missing file is not an error unless
// mustExist is set (the user named it on the command line). Unknown keys are
// an error, so a typo never silently falls back to a default.
func Load(path string, mustExist bool) (Daemon, error) {
	cfg := Default()
	if err := decodeFile(path, mustExist, &cfg); err != nil {
		return cfg, err
	}
	return cfg, nil
}

func decodeFile(path string, mustExist bool, into any) error {
	if path == "" {
		return nil
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) && !mustExist {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read configuration %s: %w", path, err)
	}
	md, err := toml.Decode(string(data), into)
	if err != nil {
		return fmt.Errorf("parse configuration %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, 0, len(und))
		for _, k := range und {
			keys = append(keys, k.String())
		}
		sort.Strings(keys)
		return fmt.Errorf("configuration %s: unknown keys: %s", path, strings.Join(keys, ", "))
	}
	return nil
}
