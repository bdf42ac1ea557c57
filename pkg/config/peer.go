package config

import "time"

// Peer configures the P2P peer inside starlingd.
type Peer struct {
	// Enable runs the peer (upload server, proxy) in this daemon.
	Enable bool `toml:"enable"`
	// Role is "peer" or "seed". A seed is preferred for origin fetches and
	// takes preheat work; give it a large storage quota.
	Role string `toml:"role"`
	// Schedulers are HOST:PORT addresses; a task's scheduler is picked by
	// rendezvous hashing of its ID. Empty: every piece from the origin.
	Schedulers []string `toml:"schedulers"`
	// AdvertiseIP is the address other peers reach this one at; empty
	// takes the upload listener's IP, else the first non-loopback one.
	AdvertiseIP string `toml:"advertise_ip"`
	// UploadListen serves pieces to other peers.
	UploadListen string `toml:"upload_listen"`
	// UploadConcurrency bounds the uploads served at once; a full peer
	// answers 503 and the downloader asks another parent. Kept small: more
	// uploads at once do not add bandwidth, they only make every piece
	// arrive later, and a piece is only worth passing on once it is whole.
	UploadConcurrency int `toml:"upload_concurrency"`
	// UploadRateLimit bounds upload bandwidth in bytes per second (0: none).
	UploadRateLimit int64 `toml:"upload_rate_limit"`
	// PieceSize cuts new tasks; 0 (the default) follows the task's length:
	// about 128 pieces, 1 to 16 MiB each. The first peer to register a task at the
	// scheduler fixes it for everyone.
	PieceSize int64 `toml:"piece_size"`
	// Concurrency is how many pieces of one task are fetched at once.
	Concurrency int `toml:"concurrency"`
	// PieceTimeout bounds one piece from a parent before it is asked of
	// another parent or the origin.
	PieceTimeout time.Duration `toml:"piece_timeout"`
	// AnnounceInterval is the heartbeat to the schedulers; 0 is 1s for a
	// peer and 250ms for a seed, which picks up work with the answers.
	AnnounceInterval time.Duration `toml:"announce_interval"`
	// Zone and Rack are location labels: parents nearby rank first.
	Zone string `toml:"zone"`
	Rack string `toml:"rack"`
	// Lazy sends the snapshotter's layer reads through the peer when
	// schedulers are configured, so lazy pulls share pieces too.
	Lazy bool `toml:"lazy"`
	// LazyFallbackAfter bounds how long a lazy read waits for its range
	// through the peer before it reads the registry directly; the blob
	// then reads the registry directly for LazyFallbackFor before the peer
	// is tried once more. A failing scheduler does the same for every blob.
	LazyFallbackAfter time.Duration `toml:"lazy_fallback_after"`
	LazyFallbackFor   time.Duration `toml:"lazy_fallback_for"`
}

// DefaultPeer is the peer section's defaults.
func DefaultPeer() Peer {
	return Peer{
		Enable:            true,
		Role:              "peer",
		UploadListen:      ":4000",
		UploadConcurrency: 8,
		Concurrency:       8,
		PieceTimeout:      30 * time.Second,
		Lazy:              true,
		LazyFallbackAfter: 2 * time.Second,
		LazyFallbackFor:   30 * time.Second,
	}
}

// Storage configures where the peer keeps task pieces (under root/peer).
type Storage struct {
	// Quota bounds the bytes of stored tasks (0: no bound).
	Quota int64 `toml:"quota"`
	// HighWatermark and LowWatermark are fractions of Quota: garbage
	// collection starts above the first and stops below the second.
	HighWatermark float64 `toml:"high_watermark"`
	LowWatermark  float64 `toml:"low_watermark"`
	// MaxAge removes tasks unused for this long (0: never).
	MaxAge time.Duration `toml:"max_age"`
}

// DefaultStorage is the storage section's defaults.
func DefaultStorage() Storage {
	return Storage{Quota: 50 << 30, HighWatermark: 0.9, LowWatermark: 0.7, MaxAge: 7 * 24 * time.Hour}
}
