package config

import "github.com/starling-dev/starling/pkg/taskid"

// Proxy configures the HTTP proxy and registry mirror. Which registries are
// reached over plain HTTP is not set here: the proxy reads the resolver's
// [resolver.host."HOST"] insecure flag, so one setting serves both.
type Proxy struct {
	// Listen is the proxy's address.
	Listen string `toml:"listen"`
	// Rules are regular expressions matched against a request's upstream
	// URL; GETs that match go through P2P, everything else straight to
	// the upstream.
	Rules []string `toml:"rules"`
	// DefaultRegistry is the upstream of a mirror request that names none
	// (no X-Dragonfly-Registry header, no ns parameter), as Docker's
	// registry-mirrors setting sends them: those are Docker Hub's.
	DefaultRegistry string `toml:"default_registry"`
	// Prefetch makes a Range request also start fetching the whole blob
	// in the background.
	Prefetch bool `toml:"prefetch"`
	// QueryFilters are the query parameters left out of a task ID for a
	// URL that is not a registry blob (signatures, expiry); a trailing *
	// matches a prefix.
	QueryFilters []string `toml:"query_filters"`
}

// DefaultProxy is the proxy section's defaults.
func DefaultProxy() Proxy {
	return Proxy{
		Listen: "127.0.0.1:4001",
		Rules:  []string{"blobs/sha256.*"},
		// Where containerd and Docker themselves send docker.io's
		// registry API requests.
		DefaultRegistry: "https://registry-1.docker.io",
		Prefetch:        false,
		QueryFilters:    append([]string(nil), taskid.DefaultFilters...),
	}
}
