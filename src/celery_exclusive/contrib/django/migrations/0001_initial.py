"""The unmanaged ``HeldLease`` model: no table, only its content type and permissions."""

from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = ()

    operations = (
        migrations.CreateModel(
            name="HeldLease",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
            ],
            options={
                "verbose_name": "held lease",
                "verbose_name_plural": "held leases",
                "permissions": (("release_lease", "Can force-release a held lease"),),
                "managed": False,
                "default_permissions": ("view",),
            },
        ),
    )
