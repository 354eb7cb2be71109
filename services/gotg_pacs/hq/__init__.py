"""HQ side: the receiver clinics sync to, and the site credentials it checks."""
