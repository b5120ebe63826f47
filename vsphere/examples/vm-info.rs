//! Prints what pilotlight reads of a VM: `vm-info URL USER PASSWORD VM`.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let s = pilotlight_vsphere::Session::connect(pilotlight_vsphere::ConnectOptions {
        url: a[1].clone(),
        user: a[2].clone(),
        password: a[3].clone(),
        thumbprint: None,
        insecure: true,
        timeout: std::time::Duration::from_secs(30),
    })
    .await?;
    for (n, m) in s.vms().await? {
        println!("{n} {m}");
    }
    let vm = s.find_vm(&a[4]).await?;
    println!("{:#?}", s.vm_info(&vm).await?);
    s.logout().await;
    Ok(())
}
