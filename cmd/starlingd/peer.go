package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/starling-dev/starling/internal/version"
	"github.com/starling-dev/starling/pkg/allow"
	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/originq"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/proxy"
	"github.com/starling-dev/starling/pkg/registry"
	"github.com/starling-dev/starling/pkg/storage"
	"github.com/starling-dev/starling/pkg/taskid"
)

func init() {
	// peer.go's init runs before snapshotter.go's, so the snapshotter
	// finds the peer in the daemon when it starts.
	components = append(components, component{name: "peer", start: startPeer})
}

func peerOptions(cfg config.Daemon, reg prometheus.Registerer, c *cluster.Cluster) (peer.Options, error) {
	switch cfg.Peer.Role {
	case "peer", "seed":
	default:
		return peer.Options{}, fmt.Errorf("peer role %q: want peer or seed", cfg.Peer.Role)
	}
	al, err := allow.New(proxy.AllowedFromConfig(cfg.Proxy, cfg.Resolver))
	if err != nil {
		return peer.Options{}, fmt.Errorf("proxy.allowed_registries: %w", err)
	}
	ot := originTransport()
	// Origin fetches (a seed's work from the scheduler included) never
	// reach loopback, link-local or metadata addresses unless a configured
	// registry names that host exactly; checked when dialled.
	ot.DialContext = al.DialContext
	rc := registry.New(cfg.Resolver, registry.WithUserAgent("starlingd/"+version.Version))
	auth := &authCache{client: rc, ttl: authTTL, m: map[string]authEntry{}}
	o := peer.Options{
		Root:              filepath.Join(cfg.Root, "peer"),
		Seed:              cfg.Peer.Role == "seed",
		Schedulers:        cfg.Peer.Schedulers,
		AdvertiseIP:       cfg.Peer.AdvertiseIP,
		UploadListen:      cfg.Peer.UploadListen,
		UploadConcurrency: cfg.Peer.UploadConcurrency,
		UploadRate:        cfg.Peer.UploadRateLimit,
		PieceSize:         cfg.Peer.PieceSize,
		Concurrency:       cfg.Peer.Concurrency,
		PieceTimeout:      cfg.Peer.PieceTimeout,
		LazyFallbackAfter: cfg.Peer.LazyFallbackAfter,
		LazyFallbackFor:   cfg.Peer.LazyFallbackFor,
		AnnounceInterval:  cfg.Peer.AnnounceInterval,
		Zone:              cfg.Peer.Zone,
		Rack:              cfg.Peer.Rack,
		Storage: storage.Options{Quota: cfg.Storage.Quota, HighWatermark: cfg.Storage.HighWatermark,
			LowWatermark: cfg.Storage.LowWatermark, MaxAge: cfg.Storage.MaxAge},
		// Origin fetches never go through an HTTP proxy from the
		// environment: it may well point at this daemon's own proxy.
		Client: &http.Client{Transport: ot},
		// No credential comes with a seed's work: it fetches with this
		// node's own (its keychain), when the origin asks for them.
		Authorizer: func(ctx context.Context, raw string) (string, error) {
			repo, err := blobRepository(rc, raw)
			if err != nil {
				return "", err
			}
			return auth.get(ctx, repo)
		},
		Logger:     slog.Default(),
		Registerer: reg,
	}
	if c.Enabled() {
		// The scheduler binds a peer to its certificate: the ID is the
		// certificate's CN, and a seed needs the seed role.
		id := c.Identity()
		if o.Seed && !id.Has(cluster.RoleSeed) {
			return peer.Options{}, fmt.Errorf("peer role seed: the cluster certificate %q has roles %v, no seed (issue it with --seed)", id.Name, id.Roles)
		}
		if !id.Member() {
			return peer.Options{}, fmt.Errorf("the cluster certificate %q has roles %v: a peer needs peer or seed", id.Name, id.Roles)
		}
		o.ID = id.Name
		o.UploadTLS = c.ServerTLS()
		o.ClientTLS = c.ClientTLS(cluster.RolePeer, cluster.RoleSeed)
		o.SchedulerTLS = c.ClientTLS(cluster.RoleScheduler)
	}
	return o, nil
}

func originTransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil
	t.MaxIdleConnsPerHost = 32
	return t
}

// startPeer runs the P2P peer: upload server, scheduler client and the
// proxy / registry mirror.
func startPeer(ctx context.Context, cfg config.Daemon, d *daemon) (func(context.Context) error, error) {
	if !cfg.Peer.Enable {
		return nil, nil
	}
	o, err := peerOptions(cfg, d.metrics, d.cluster)
	if err != nil {
		return nil, err
	}
	if !d.cluster.Enabled() {
		// Only the upload server speaks to other members; metrics,
		// health and the proxy are this node's own (docs/security.md).
		if err := cluster.CheckPlaintext(cfg.Cluster, cfg.Peer.UploadListen); err != nil {
			return nil, err
		}
		slog.Warn("running without cluster TLS: whoever reaches the upload server or the schedulers is taken for a member",
			"upload", cfg.Peer.UploadListen, "insecure", cfg.Cluster.Insecure)
	}
	// The peer's origin requests share the daemon's gate with the lazy
	// reads. A seed's are whole blobs for the cluster: Seed priority,
	// unless the request's context says otherwise. A plain peer's are
	// downloads a client waits on.
	prio := originq.Demand
	if o.Seed {
		prio = originq.Seed
	}
	o.Client.Transport = originq.Transport(d.gate, o.Client.Transport, prio)
	p, err := peer.New(o)
	if err != nil {
		return nil, err
	}
	if err := p.Start(ctx); err != nil {
		p.Close()
		return nil, err
	}
	d.peer = p
	stopProxy, err := startProxy(cfg, d, p)
	if err != nil {
		p.Close()
		return nil, err
	}
	slog.Info("peer started", "id", p.ID(), "role", cfg.Peer.Role, "upload", p.UploadAddr(),
		"schedulers", cfg.Peer.Schedulers, "proxy", cfg.Proxy.Listen)
	return func(ctx context.Context) error {
		if stopProxy != nil {
			_ = stopProxy(ctx)
		}
		return p.Close()
	}, nil
}

// blobRepository is the repository a registry blob URL names.
func blobRepository(reg *registry.Client, raw string) (name.Repository, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return name.Repository{}, err
	}
	d, ok := taskid.RegistryDigest(u)
	if !ok {
		return name.Repository{}, fmt.Errorf("%s: not a registry blob", u.Redacted())
	}
	path := strings.TrimSuffix(strings.TrimPrefix(u.Path, "/v2/"), "/blobs/"+d)
	return reg.ParseRepository(u.Host + "/" + path)
}
