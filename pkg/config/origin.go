package config

// Origin configures starlingd's link to origins (registries), shared by
// every kind of work that uses it: lazy reads, prefetch, background fetch
// and the peer's fetches.
type Origin struct {
	// MaxRequestsPerHost bounds the requests in flight to one origin host
	// from this daemon, all priorities together. Demand reads may use
	// every slot, prefetch all but two, background fetch half, a seed's
	// whole-blob pulls a quarter (at least one each); waiters are served
	// demand first. 0 turns the bound off.
	MaxRequestsPerHost int `toml:"max_requests_per_host"`
}

// DefaultOrigin is the origin section's defaults: 16 per host leaves 4 for
// seed work and 8 for background fetch, enough streams to fill a link,
// while at least 2 stay free for reads a container is blocked on.
func DefaultOrigin() Origin {
	return Origin{MaxRequestsPerHost: 16}
}
