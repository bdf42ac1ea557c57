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
	// AllowedRegistries are the upstreams the proxy and the peer's origin
	// fetches may reach besides the registries of the [resolver] section
	// and DefaultRegistry, which are always allowed: "host", "host:port",
	// "host:*" (any port), "*.domain" (any subdomain). A host without a
	// port is reached on 80 and 443 only. Loopback, link-local and cloud
	// metadata addresses are refused unless an entry names the host
	// exactly (no wildcard).
	AllowedRegistries []string `toml:"allowed_registries"`
	// Connect is what CONNECT may do: "off" (refused) or "allowed" (a
	// tunnel to an allowed host on port 443 only).
	Connect string `toml:"connect"`
	// HostsDir is containerd's registry hosts directory (its config_path):
	// the registries it names (one directory each, as `starling setup
	// containerd --mirror` writes them) are allowed too. Empty: none.
	HostsDir string `toml:"hosts_dir"`
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
		// A tunnel is opaque: no P2P, no check of what passes. containerd
		// (hosts.toml) and starling get never need one.
		Connect:  "off",
		HostsDir: "/etc/containerd/certs.d",
	}
}
