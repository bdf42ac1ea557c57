package peer

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/starling-dev/starling/pkg/storage"
)

// Options configures a Peer.
type Options struct {
	// Root holds the task storage and the peer's persisted ID.
	Root string
	// ID names the peer to the scheduler; empty reads or makes Root/peer-id.
	ID string
	// Seed marks a seed peer: preferred for origin fetches, takes preheat work.
	Seed bool
	// Schedulers are HOST:PORT; empty runs standalone (every piece from the origin).
	Schedulers []string
	// AdvertiseIP is the address other peers reach this one at.
	AdvertiseIP string
	// UploadListen is the upload server's address; empty serves nothing.
	UploadListen string
	// UploadConcurrency bounds concurrent uploads; UploadRate (bytes/s, 0 = unlimited) their bandwidth.
	UploadConcurrency int
	UploadRate        int64
	// PieceSize cuts new tasks; 0 follows each task's length (piece.SizeFor).
	PieceSize int64
	// Concurrency is how many pieces of one task are downloaded at once.
	Concurrency int
	// Zone and Rack are location labels for parent ranking.
	Zone, Rack string
	// Storage bounds the task storage.
	Storage storage.Options
	// AnnounceInterval is the heartbeat period (0: 1s, 250ms for a seed).
	AnnounceInterval time.Duration
	// PieceTimeout bounds one piece download from a parent before it is asked elsewhere.
	PieceTimeout time.Duration
	// LazyFallbackAfter is how long a LazyFetcher read waits for its range
	// through the peer before it reads the registry directly (0: 2s).
	LazyFallbackAfter time.Duration
	// LazyFallbackFor is how long a blob's lazy reads go to the registry
	// directly after the peer path failed, before it is tried once more
	// (0: 30s).
	LazyFallbackFor time.Duration
	// UploadTLS, when set, makes the upload server TLS only; it should
	// require client certificates (cluster.ServerTLS), so that only
	// members fetch pieces and ranges.
	UploadTLS *tls.Config
	// ClientTLS, when set, is used to fetch from parents (over https) and,
	// unless SchedulerTLS is set, to reach the schedulers (cluster.ClientTLS).
	ClientTLS *tls.Config
	// SchedulerTLS, when set, is used to reach the schedulers; it should
	// insist on the scheduler role (cluster.ClientTLS(cluster.RoleScheduler)).
	SchedulerTLS *tls.Config
	// Client fetches from the origin for HTTPSource; nil uses http.DefaultClient.
	Client *http.Client
	// Authorizer, when set, gives the Authorization header this node's own
	// credentials earn for url (a registry token for the blob's
	// repository). HTTPSource asks it when the origin answers 401 and
	// tries once more: a seed fetches with its own keychain, since no
	// credential travels with the work.
	Authorizer func(ctx context.Context, url string) (string, error)
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Source is the origin of a task.
type Source interface {
	// Size returns the blob's length.
	Size(ctx context.Context) (int64, error)
	// Fetch returns length bytes of the blob from off.
	Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error)
}

// Request names a task to download.
type Request struct {
	// TaskID is taskid.ForURL of URL, or the blob digest.
	TaskID string
	// URL and Header let a seed peer fetch the task itself.
	URL    string
	Header http.Header
	// Digest ("sha256:<hex>"), when set, is checked once the task is whole.
	Digest string
	// Length, when known, saves asking the origin.
	Length int64
	// Source fetches from the origin; nil makes an HTTPSource of URL and Header.
	Source Source
	// Lazy marks a task opened for range reads (a lazily mounted layer):
	// a restarted peer keeps its pieces for serving but does not resume it
	// as a full download, and its headers are not written to disk.
	Lazy bool
}

// OriginError is an origin's refusal (401, 404, ...). The proxy relays its
// status and headers so a client can, say, fetch a token and try again.
type OriginError struct {
	URL        string
	StatusCode int
	Header     http.Header
}

func (e *OriginError) Error() string {
	return "origin " + e.URL + ": " + http.StatusText(e.StatusCode)
}
