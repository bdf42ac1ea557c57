package config

import "time"

// FS configures lazy layers: chunk fetching, caching and prefetch.
type FS struct {
	// Prefetch fetches the prioritized region of a layer (before the
	// prefetch landmark) at mount, in one request.
	Prefetch bool `toml:"prefetch"`
	// BackgroundFetch fetches the rest of a layer after mount, at low
	// priority, paused while a container waits on a read.
	BackgroundFetch bool `toml:"background_fetch"`
	// BackgroundFetchDelay waits after a mount before background fetch
	// starts, so that it does not compete with the container's start.
	BackgroundFetchDelay time.Duration `toml:"background_fetch_delay"`
	// FetchTimeout bounds one fetch of chunks; a dead registry gives EIO
	// to the reader after this long, never a hang.
	FetchTimeout time.Duration `toml:"fetch_timeout"`
	// CacheSize bounds the on-disk chunk cache in bytes (0: no bound).
	CacheSize int64 `toml:"cache_size"`
	// TailFetchSize is how much of a layer's end is fetched at once when its
	// footer is read, so that footer and TOC usually come in one request.
	TailFetchSize int64 `toml:"tail_fetch_size"`
	// MaxTOCSize bounds a layer's decompressed TOC in bytes; a layer whose
	// TOC is larger is refused before it costs memory.
	MaxTOCSize int64 `toml:"max_toc_size"`
	// MaxTOCEntries bounds the entries of a layer's TOC.
	MaxTOCEntries int `toml:"max_toc_entries"`
	// MaxChunkSize bounds one chunk's uncompressed size and the bytes that
	// must be decompressed to reach it, so one read costs bounded memory and
	// CPU whatever the TOC claims.
	MaxChunkSize int64 `toml:"max_chunk_size"`
	// Passthrough serves files whose bytes are all local with FUSE
	// passthrough, where the kernel supports it.
	Passthrough bool `toml:"passthrough"`
}

// DefaultFS is the fs section's defaults.
func DefaultFS() FS {
	return FS{
		Prefetch:             true,
		BackgroundFetch:      true,
		BackgroundFetchDelay: 5 * time.Second,
		FetchTimeout:         30 * time.Second,
		CacheSize:            20 << 30,
		TailFetchSize:        256 << 10,
		MaxTOCSize:           64 << 20,
		MaxTOCEntries:        1 << 18,
		MaxChunkSize:         64 << 20,
		Passthrough:          true,
	}
}
