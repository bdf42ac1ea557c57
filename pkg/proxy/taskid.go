package proxy

import (
	"net/url"

	"github.com/starling-dev/starling/pkg/taskid"
)

// RegistryTaskID is the task ID of a registry blob URL the proxy serves
// through P2P: taskid.ForRegistryBlob, which says why it names the
// registry as well as the digest.
func RegistryTaskID(u *url.URL) (string, bool) { return taskid.ForRegistryBlob(u) }

// canonicalHost is a registry's host as task IDs and access checks name it.
func canonicalHost(u *url.URL) string { return taskid.CanonicalHost(u) }
