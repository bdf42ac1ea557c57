// Package dockerhosts configures containerd's registry resolver from
// starling's resolver section, so that `starling pull` reaches each
// registry and mirror exactly as starling's own client does: the scheme,
// TLS settings and headers of registry.Config.HostPolicy, and requests
// through registry.NewTransport (deadlines, retries). It is apart from
// package registry so that binaries without containerd do not link it.
package dockerhosts

import (
	"net/http"

	"github.com/containerd/containerd/remotes"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"

	"github.com/starling-dev/starling/pkg/registry"
)

// Hosts returns containerd's per-host configuration for cfg: a host's
// mirrors first, for pulls, then the host itself. Credentials come from kc
// (authn.DefaultKeychain when nil).
func Hosts(cfg registry.Config, kc authn.Keychain) docker.RegistryHosts {
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	client := &http.Client{Transport: registry.NewTransport(cfg)}
	authorizer := docker.NewDockerAuthorizer(docker.WithAuthClient(client), docker.WithAuthCreds(creds(kc)))
	return func(host string) ([]docker.RegistryHost, error) {
		hp := cfg.HostPolicy(host)
		var out []docker.RegistryHost
		for _, m := range hp.Mirrors {
			out = append(out, docker.RegistryHost{
				Client: client, Authorizer: authorizer, Host: m.Host, Scheme: m.Scheme(), Path: "/v2",
				Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve, Header: m.Header,
			})
		}
		h := host
		if h == "docker.io" {
			// Where containerd's default configuration sends Docker Hub.
			h = "registry-1.docker.io"
		}
		return append(out, docker.RegistryHost{
			Client: client, Authorizer: authorizer, Host: h, Scheme: hp.Origin.Scheme(), Path: "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve | docker.HostCapabilityPush,
			Header:       hp.Origin.Header,
		}), nil
	}
}

// Resolver is containerd's resolver over Hosts.
func Resolver(cfg registry.Config, kc authn.Keychain) remotes.Resolver {
	return docker.NewResolver(docker.ResolverOptions{Hosts: Hosts(cfg, kc)})
}

// creds answers containerd's authorizer from a go-containerregistry keychain.
func creds(kc authn.Keychain) func(host string) (string, string, error) {
	return func(host string) (string, string, error) {
		reg, err := name.NewRegistry(host, name.WeakValidation)
		if err != nil {
			return "", "", nil
		}
		a, err := kc.Resolve(reg)
		if err != nil {
			return "", "", err
		}
		ac, err := a.Authorization()
		if err != nil {
			return "", "", err
		}
		if ac.IdentityToken != "" {
			return "", ac.IdentityToken, nil
		}
		return ac.Username, ac.Password, nil
	}
}
