package config

// Snapshotter configures the containerd remote snapshotter.
type Snapshotter struct {
	// Enable serves the snapshots API; false runs the peer alone.
	Enable bool `toml:"enable"`
	// Address is the unix socket containerd's proxy plugin dials.
	Address string `toml:"address"`
}

// DefaultSnapshotter is the snapshotter section's defaults.
func DefaultSnapshotter() Snapshotter {
	return Snapshotter{Enable: true, Address: "/run/starling/starlingd.sock"}
}
