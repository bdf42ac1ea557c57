package config

// Proxy configures the HTTP proxy and registry mirror.
type Proxy struct {
	// Listen is the proxy's address.
	Listen string `toml:"listen"`
}

// DefaultProxy is the proxy section's defaults.
func DefaultProxy() Proxy {
	return Proxy{Listen: "127.0.0.1:4001"}
}
