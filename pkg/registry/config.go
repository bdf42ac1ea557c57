package registry

import (
	"net/http"
	"time"
)

// Config is the resolver section of starling's configuration. It is written
// the way stargz-snapshotter users write theirs:
//
//	[resolver.host."docker.io"]
//	  [[resolver.host."docker.io".mirrors]]
//	    host = "127.0.0.1:4001"
//	    insecure = true
//	    header = { X-Dragonfly-Registry = ["https://index.docker.io"] }
type Config struct {
	// Host holds per-registry settings, keyed by registry host[:port].
	Host map[string]HostConfig `toml:"host"`
	// RequestTimeout bounds the wait for a response's headers and, while a
	// body is read, the longest stall between two reads.
	RequestTimeout time.Duration `toml:"request_timeout"`
	// DialTimeout bounds connection set-up.
	DialTimeout time.Duration `toml:"dial_timeout"`
	// Retries is how many times a request that failed with 429, 5xx or a
	// connection error is tried again.
	Retries int `toml:"retries"`
	// MaxRetryWait caps the wait between tries, Retry-After included.
	MaxRetryWait time.Duration `toml:"max_retry_wait"`
	// PlainHTTP reaches every host over plain HTTP: the command line's
	// --plain-http, not a key of the file.
	PlainHTTP bool `toml:"-"`
}

// HostConfig is one registry's settings.
type HostConfig struct {
	// Insecure reaches the registry over plain HTTP.
	Insecure bool `toml:"insecure"`
	// SkipVerify accepts any TLS certificate.
	SkipVerify bool `toml:"skip_verify"`
	// Header is added to every request to this registry.
	Header http.Header `toml:"header"`
	// Mirrors are tried in order for reads before the registry itself.
	Mirrors []Mirror `toml:"mirrors"`
}

// Mirror is a read-only endpoint that serves the same repositories.
type Mirror struct {
	// Host is the mirror's host[:port].
	Host string `toml:"host"`
	// Insecure reaches the mirror over plain HTTP.
	Insecure bool `toml:"insecure"`
	// SkipVerify accepts any TLS certificate.
	SkipVerify bool `toml:"skip_verify"`
	// Header is added to every request to this mirror, e.g. X-Dragonfly-Registry.
	Header http.Header `toml:"header"`
}

// DefaultConfig returns the resolver defaults.
func DefaultConfig() Config {
	return Config{
		RequestTimeout: 30 * time.Second,
		DialTimeout:    10 * time.Second,
		Retries:        4,
		MaxRetryWait:   30 * time.Second,
	}
}

func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = d.RequestTimeout
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = d.DialTimeout
	}
	if c.Retries < 0 {
		c.Retries = 0
	}
	if c.MaxRetryWait <= 0 {
		c.MaxRetryWait = d.MaxRetryWait
	}
	return c
}
