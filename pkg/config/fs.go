package config

// FS configures lazy layers: chunk fetching, caching and prefetch.
type FS struct {
	// Prefetch fetches the prioritized region of a layer at mount.
	Prefetch bool `toml:"prefetch"`
	// BackgroundFetch fetches the rest of a layer after mount, at low priority.
	BackgroundFetch bool `toml:"background_fetch"`
}

// DefaultFS is the fs section's defaults.
func DefaultFS() FS {
	return FS{Prefetch: true, BackgroundFetch: true}
}
