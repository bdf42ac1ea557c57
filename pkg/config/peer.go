package config

// Peer configures the P2P peer inside starlingd.
type Peer struct {
	// Enable runs the peer (upload server, proxy) in this daemon.
	Enable bool `toml:"enable"`
	// Role is "peer" or "seed".
	Role string `toml:"role"`
	// Schedulers are HOST:PORT addresses; a task's scheduler is picked by rendezvous hashing.
	Schedulers []string `toml:"schedulers"`
	// AdvertiseIP is the address other peers reach this one at; empty picks the first non-loopback one.
	AdvertiseIP string `toml:"advertise_ip"`
	// UploadListen serves pieces to other peers.
	UploadListen string `toml:"upload_listen"`
}

// DefaultPeer is the peer section's defaults.
func DefaultPeer() Peer {
	return Peer{Enable: true, Role: "peer", UploadListen: ":4000"}
}

// Storage configures where the peer keeps task pieces.
type Storage struct{}

// DefaultStorage is the storage section's defaults.
func DefaultStorage() Storage { return Storage{} }
