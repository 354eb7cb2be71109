"""The appliance's one HTTPS origin: the site's certificate authority (`tls`), nginx in front of
every web backend (`nginx`), and the `pacs tls` commands."""
